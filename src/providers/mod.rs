//! Model providers. A step's model call goes through [`Providers::complete`], which picks the
//! provider (the sandbox's simulated model, or a real one) and turns every reply into either a
//! [`LlmReply`] or a classified [`StepError`].

pub mod sandbox;

use crate::config::Config;
use crate::error::{ErrorKind, StepError};
use std::sync::Arc;

pub use sandbox::SimulatedModel;

/// The default model when neither the node nor the blueprint's defaults name one
/// (the original's "fast" choice).
pub const DEFAULT_MODEL: &str = "mistralai/Mistral-7B-Instruct-v0.2";

/// One model call, after templates were rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    pub provider: String,
    pub model: String,
    pub system: Option<String>,
    pub prompt: String,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// The `forEach` item this call is about, if any. Only the sandbox reads it, to write
    /// about the item rather than about the prompt's fixed words.
    pub subject: Option<String>,
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmReply {
    pub text: String,
    pub tokens_used: Option<u64>,
    pub provider: String,
    pub model: String,
    pub cached: bool,
}

/// Which attempt of which step is calling: the sandbox derives its injected failures from it,
/// so a seed reproduces the same failures whatever the scheduling.
#[derive(Debug, Clone, Copy)]
pub struct AttemptKey<'a> {
    pub step: &'a str,
    pub attempt: u32,
}

/// The provider chain of a process.
#[derive(Clone)]
pub struct Providers {
    config: Arc<Config>,
}

impl Providers {
    pub fn new(config: Arc<Config>) -> Providers {
        Providers { config }
    }

    /// Calls the model. In a sandbox run every call goes to `sandbox`.
    pub async fn complete(
        &self,
        req: &LlmRequest,
        key: AttemptKey<'_>,
        sandbox: Option<&SimulatedModel>,
    ) -> Result<LlmReply, StepError> {
        if let Some(sim) = sandbox {
            return sim.complete(req, key).await;
        }
        if req.provider == "sandbox" {
            return SimulatedModel::new(0.0, 0, self.config.sandbox_latency)
                .complete(req, key)
                .await;
        }
        Err(self.no_provider_error())
    }

    fn no_provider_error(&self) -> StepError {
        StepError::new(
            ErrorKind::Config,
            "no model provider is configured: set HUGGINGFACE_TOKEN in .env (create a read \
             token at https://huggingface.co/settings/tokens), or USE_OLLAMA=true with a local \
             `ollama serve`, or OPENAI_BASE_URL for an OpenAI-compatible server — or try the \
             blueprint first with --sandbox",
        )
    }
}
