//! Model providers. A step's model call goes through [`Providers::complete_with`], which picks
//! the provider chain, answers from the cache when it can, waits for the provider's rate
//! limiter, calls the real client, and turns every reply into either an [`LlmReply`] or a
//! classified [`StepError`]. Providers never retry: the engine does (one exhaustive decision
//! in `error.rs`).
//!
//! - `huggingface.rs`: the HF router (chat completions) and the hf-inference text-generation
//!   path; `ollama.rs`: `/api/chat` NDJSON, tags, pull; `openai.rs`: any OpenAI-compatible
//!   server (SSE), also used for the HF router.
//! - `wire.rs`: capped bodies, stream framing, error bodies → kinds with the fix.
//! - `limiter.rs`: per-provider request rate, and the whole-provider pause after a 429.
//! - `slots.rs`: per-provider cap on calls in flight (`*_CONCURRENCY`, or llama-server's
//!   `/props` `total_slots`).
//! - `library.rs`: `call_hugging_face_model`, the original's library call.
//! - `doctor.rs`: the live checks of `omniflow doctor`.
//! - `sandbox.rs`: the simulated model with seeded failure injection.
//!
//! **The `auto` chain** (a node's default provider): Ollama first when `USE_OLLAMA=true`, then
//! Hugging Face when a token is set, then the OpenAI-compatible server when `OPENAI_BASE_URL`
//! is set. A *provider-level* failure — unreachable (`network`), `auth`, `credits_exhausted`,
//! `model_not_supported`, `config` — moves to the next link; anything about this one call
//! (rate limit, loading, timeout, server error, bad or empty reply, invalid request) is
//! returned at once and the engine retries the whole chain. The answering provider is
//! recorded on the attempt and step; the skipped links and why are in [`LlmReply::fallback`]
//! (recorded in `runner_attempts.fallback`).

// Nothing in a reply may take the process down: no unwrap/expect/panic outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod doctor;
pub mod fleet_rates;
pub mod huggingface;
pub mod library;
pub mod limiter;
pub mod ollama;
pub mod openai;
pub mod sandbox;
pub mod slots;
pub(crate) mod wire;

use crate::blueprint::ProviderName;
use crate::config::Config;
use crate::error::{ErrorKind, RetryClass, StepError};
use crate::store::{CachedAnswer, Store};
use limiter::Limiter;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use library::{call_hugging_face_model, Request, Response};
pub use sandbox::SimulatedModel;
// Model names are known below the providers (configuration and the store use them too).
pub use crate::models::{same_model, DEFAULT_MODEL, MODEL_TABLE};

/// One model call, after templates were rendered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Links of the `auto` chain that were tried and skipped before this one answered, and
    /// why (`ollama: network: …`); `None` when the first link answered.
    pub fallback: Option<String>,
    /// The model the server says answered, when it says (`model` is the one asked for): a
    /// local server answers with its one loaded model whatever was asked.
    pub reply_model: Option<String>,
    /// Why generation stopped (`stop`, `length`, …), when the server says.
    pub finish_reason: Option<String>,
}

impl LlmReply {
    /// True when the answer was cut off: the server stopped at `maxTokens` or at its
    /// context size (`finish_reason: "length"`).
    pub fn truncated(&self) -> bool {
        is_truncation(self.finish_reason.as_deref())
    }

    /// True when the server named a model other than the one asked for.
    pub fn model_differs(&self) -> bool {
        self.reply_model
            .as_deref()
            .is_some_and(|m| !same_model(&self.model, m))
    }
}

/// `finish_reason` values that mean the answer was cut off (OpenAI's `length`; Ollama's
/// `done_reason: "length"`).
pub fn is_truncation(finish_reason: Option<&str>) -> bool {
    finish_reason == Some("length")
}

/// Which attempt of which step is calling: the sandbox derives its injected failures from it,
/// so a seed reproduces the same failures whatever the scheduling.
#[derive(Debug, Clone, Copy)]
pub struct AttemptKey<'a> {
    pub step: &'a str,
    pub attempt: u32,
}

/// Live progress of a streamed answer: called with the number of tokens received so far
/// (roughly: one per streamed chunk). The engine publishes it as `Event::Tokens`.
pub type Progress<'a> = Option<&'a (dyn Fn(u64) + Send + Sync)>;

/// How one call is made, beyond the request itself.
#[derive(Clone, Copy)]
pub struct CallOptions<'a> {
    pub key: AttemptKey<'a>,
    /// A sandbox run's simulated model: every call goes there.
    pub sandbox: Option<&'a SimulatedModel>,
    pub progress: Progress<'a>,
    /// Read and write the response cache (a node's `"cache": false` turns it off).
    pub cache: bool,
    /// Skip reading the cache but still write the fresh answer: the engine sets it on a
    /// retry, because the cached answer may be what failed (e.g. not the JSON the node
    /// parses), and a retry must reach the model.
    pub refresh: bool,
    /// Overrides `USE_OLLAMA` for the `auto` chain (the library call's `use_ollama`).
    pub use_ollama: Option<bool>,
    /// The node parses the answer as JSON (`parse: "json"`): a sandbox answers JSON then, as
    /// a model told to would, so what follows the node can be tried offline.
    pub json: bool,
}

impl<'a> CallOptions<'a> {
    pub fn new(key: AttemptKey<'a>) -> CallOptions<'a> {
        CallOptions {
            key,
            sandbox: None,
            progress: None,
            cache: true,
            refresh: false,
            use_ollama: None,
            json: false,
        }
    }
}

/// One link of a provider chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    Ollama,
    HuggingFace,
    HfInference,
    OpenAi,
}

impl Link {
    /// The name recorded in history (`runner_steps.provider`).
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Ollama => ProviderName::Ollama,
            Link::HuggingFace => ProviderName::HuggingFace,
            Link::HfInference => ProviderName::HfInference,
            Link::OpenAi => ProviderName::OpenAi,
        }
        .as_str()
    }

    /// The name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Link::Ollama => "Ollama",
            Link::HuggingFace => "Hugging Face",
            Link::HfInference => "Hugging Face (hf-inference)",
            Link::OpenAi => "the OpenAI-compatible server",
        }
    }

    /// The variable that sets its address.
    pub fn url_var(self) -> &'static str {
        match self {
            Link::Ollama => "OLLAMA_URL",
            Link::HuggingFace | Link::HfInference => "HF_INFERENCE_URL",
            Link::OpenAi => "OPENAI_BASE_URL",
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a failure of one link moves an `auto` chain to the next. No `_` arm: a new kind
/// must be decided here too.
pub fn falls_through(kind: ErrorKind) -> bool {
    match kind {
        ErrorKind::Network
        | ErrorKind::Auth
        | ErrorKind::CreditsExhausted
        | ErrorKind::ModelNotSupported
        | ErrorKind::Config => true,
        ErrorKind::Timeout
        | ErrorKind::RateLimited
        | ErrorKind::ModelLoading
        | ErrorKind::Server
        | ErrorKind::InvalidRequest
        | ErrorKind::EmptyOutput
        | ErrorKind::TruncatedStream
        | ErrorKind::BadResponse
        | ErrorKind::BudgetExceeded
        | ErrorKind::Cancelled
        | ErrorKind::Template
        | ErrorKind::Internal
        | ErrorKind::Interrupted => false,
    }
}

/// A chat call as the clients see it.
pub(crate) struct Chat<'a> {
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub prompt: &'a str,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
}

/// What a client returns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub text: String,
    pub tokens: Option<u64>,
    /// The model the reply says answered (`model` of an OpenAI reply, Ollama's `model`).
    pub model: Option<String>,
    /// Why generation stopped, as the server says it (`stop`, `length`, …).
    pub finish_reason: Option<String>,
}

impl Answer {
    pub fn new(text: String, tokens: Option<u64>) -> Answer {
        Answer {
            text,
            tokens,
            model: None,
            finish_reason: None,
        }
    }
}

/// The rate limiters and in-flight caps, one per provider (`hf-inference` shares Hugging
/// Face's).
struct Limits {
    ollama: Arc<Limiter>,
    hf: Arc<Limiter>,
    openai: Arc<Limiter>,
    ollama_slots: slots::Slots,
    hf_slots: slots::Slots,
    openai_slots: slots::Slots,
}

/// A model call's place in its first provider's rate limit, taken before the call
/// ([`Providers::admit`]): the engine waits for it outside the pool, so a call held back by
/// the limit does not hold a worker that other runs could use.
#[derive(Debug)]
pub struct Admission {
    link: Link,
    grant: limiter::Grant,
    /// The call's place among the provider's calls in flight, taken ahead
    /// ([`Providers::in_flight_limit`]); held until the call ends.
    slot: Option<slots::Slot>,
}

impl Admission {
    /// How long until the call may go.
    pub fn wait(&self) -> Duration {
        self.grant.wait()
    }

    /// True when a 429 paused the provider after the place was taken: admit again.
    pub fn voided(&self) -> bool {
        self.grant.paused()
    }

    /// The provider whose limit holds the call back (for messages).
    pub fn provider(&self) -> &'static str {
        self.link.as_str()
    }

    /// Keeps `slot` (a place among the provider's calls in flight) until the call ends.
    pub fn hold(&mut self, slot: slots::Slot) {
        self.slot = Some(slot);
    }
}

/// The provider chain of a process; cheap to clone.
#[derive(Clone)]
pub struct Providers {
    config: Arc<Config>,
    http: reqwest::Client,
    store: Option<Store>,
    limits: Arc<Limits>,
    /// With a fleet: the rate limits are the fleet's, taken from its database.
    fleet_rates: Option<Arc<crate::providers::fleet_rates::FleetRates>>,
}

impl Providers {
    pub fn new(config: Arc<Config>) -> Providers {
        // No overall timeout: the engine's attempt timeout (or the library call's) drops the
        // future, which closes the connection; nothing here outlives it.
        let http = reqwest::Client::builder()
            .user_agent(concat!("omniflow/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let scale = config.time_scale;
        let limits = Arc::new(Limits {
            ollama: Arc::new(Limiter::new(config.ollama_rate_limit, scale)),
            hf: Arc::new(Limiter::new(config.hf_rate_limit, scale)),
            openai: Arc::new(Limiter::new(config.openai_rate_limit, scale)),
            ollama_slots: slots::Slots::new(config.ollama_concurrency, false),
            hf_slots: slots::Slots::new(config.hf_concurrency, false),
            openai_slots: slots::Slots::new(config.openai_concurrency, true),
        });
        Providers {
            config,
            http,
            store: None,
            limits,
            fleet_rates: None,
        }
    }

    /// Counts the rate limits fleet-wide in `rates` instead of in this process: the local
    /// limiters keep only the pauses a 429 asks for.
    pub fn with_fleet_rates(
        mut self,
        rates: crate::providers::fleet_rates::FleetRates,
    ) -> Providers {
        let c = &self.config;
        let scale = c.time_scale;
        self.limits = Arc::new(Limits {
            ollama: Arc::new(Limiter::new(None, scale)),
            hf: Arc::new(Limiter::new(None, scale)),
            openai: Arc::new(Limiter::new(None, scale)),
            ollama_slots: slots::Slots::new(c.ollama_concurrency, false),
            hf_slots: slots::Slots::new(c.hf_concurrency, false),
            openai_slots: slots::Slots::new(c.openai_concurrency, true),
        });
        self.fleet_rates = Some(Arc::new(rates));
        self
    }

    /// Keeps the response cache in `store`.
    pub fn with_store(mut self, store: Store) -> Providers {
        self.store = Some(store);
        self
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// How long `link` stays paused by a 429 (zero when it is not): every call to it waits.
    pub fn paused_for(&self, link: Link) -> Duration {
        self.limiter(link).paused_for()
    }

    /// The cap on `link`'s calls in flight (`None`: uncapped), asking the OpenAI-compatible
    /// server for its slot count the first time when `OPENAI_CONCURRENCY` is unset.
    pub async fn slot_limit(&self, link: Link) -> Option<slots::SlotLimit> {
        let c = &self.config;
        match link {
            Link::Ollama => {
                self.limits
                    .ollama_slots
                    .limit(&self.http, link, None, None)
                    .await
            }
            Link::HuggingFace | Link::HfInference => {
                self.limits
                    .hf_slots
                    .limit(&self.http, link, None, None)
                    .await
            }
            Link::OpenAi => {
                let props = c.openai_base_url.as_deref().map(slots::props_url);
                self.limits
                    .openai_slots
                    .limit(
                        &self.http,
                        link,
                        props.as_deref(),
                        c.openai_api_key.as_deref(),
                    )
                    .await
            }
        }
    }

    /// The cap on calls in flight of the provider `req` goes to first, with that provider
    /// (`None`: uncapped, a sandbox call, or no provider configured). The engine takes its
    /// slot before the pool ([`slots::SlotLimit::try_take`], else waits visibly) and hands it
    /// over with [`Admission::hold`].
    pub async fn in_flight_limit(
        &self,
        req: &LlmRequest,
        use_ollama: Option<bool>,
    ) -> Option<(Link, slots::SlotLimit)> {
        if req.provider == ProviderName::Sandbox.as_str() {
            return None;
        }
        let link = *self.chain(&req.provider, use_ollama).ok()?.first()?;
        Some((link, self.slot_limit(link).await?))
    }

    fn limiter(&self, link: Link) -> &Arc<Limiter> {
        match link {
            Link::Ollama => &self.limits.ollama,
            Link::HuggingFace | Link::HfInference => &self.limits.hf,
            Link::OpenAi => &self.limits.openai,
        }
    }

    /// Calls the model. In a sandbox run every call goes to `sandbox`.
    pub async fn complete(
        &self,
        req: &LlmRequest,
        key: AttemptKey<'_>,
        sandbox: Option<&SimulatedModel>,
    ) -> Result<LlmReply, StepError> {
        let mut opts = CallOptions::new(key);
        opts.sandbox = sandbox;
        self.complete_with(req, opts).await
    }

    /// Takes `req`'s place in the rate limit of the provider it goes to first (`None` when it
    /// goes to no real provider, or to none that is configured: the call itself says why).
    /// Wait [`Admission::wait`], then pass it to [`Providers::complete_admitted`].
    pub fn admit(&self, req: &LlmRequest, use_ollama: Option<bool>) -> Option<Admission> {
        if req.provider == ProviderName::Sandbox.as_str() {
            return None;
        }
        let link = *self.chain(&req.provider, use_ollama).ok()?.first()?;
        Some(Admission {
            link,
            grant: self.limiter(link).reserve(),
            slot: None,
        })
    }

    /// Calls the model with every option (progress, cache, chain order).
    pub async fn complete_with(
        &self,
        req: &LlmRequest,
        opts: CallOptions<'_>,
    ) -> Result<LlmReply, StepError> {
        self.complete_admitted(req, opts, None).await
    }

    /// [`Providers::complete_with`] for a call admitted ahead ([`Providers::admit`]): the
    /// first provider's limiter is not waited for again while the place still holds.
    pub async fn complete_admitted(
        &self,
        req: &LlmRequest,
        opts: CallOptions<'_>,
        mut admission: Option<Admission>,
    ) -> Result<LlmReply, StepError> {
        if let Some(sim) = opts.sandbox {
            let mut reply = sim.complete(req, opts.key, opts.progress).await?;
            if opts.json {
                reply.text = sandbox::json_answer(req, &reply.text);
            }
            return Ok(reply);
        }
        if req.provider == ProviderName::Sandbox.as_str() {
            return SimulatedModel::new(0.0, 0, self.config.sandbox_latency)
                .with_time_scale(self.config.time_scale)
                .complete(req, opts.key, opts.progress)
                .await;
        }
        let auto = req.provider == "auto";
        let chain = self.chain(&req.provider, opts.use_ollama)?;

        let key = (opts.cache && !self.config.cache_ttl.is_zero() && self.store.is_some())
            .then(|| cache_key(req));
        if let Some(k) = key.as_ref().filter(|_| !opts.refresh) {
            if let Some(hit) = self.cache_get(k).await {
                return Ok(LlmReply {
                    text: hit.output,
                    tokens_used: Some(0),
                    provider: hit.provider,
                    model: hit.model,
                    cached: true,
                    fallback: None,
                    reply_model: None,
                    finish_reason: None,
                });
            }
        }

        let mut skipped: Vec<(Link, StepError)> = Vec::new();
        for (i, &link) in chain.iter().enumerate() {
            let model = self.model_for(link, &req.model, auto);
            let (admitted, slot) = match admission.take_if(|a| a.link == link) {
                Some(a) => (Some(a.grant), a.slot),
                None => (None, None),
            };
            match self
                .call_link(link, req, &model, opts.progress, admitted, slot)
                .await
            {
                Ok(answer) => {
                    let fallback = (!skipped.is_empty()).then(|| describe_skips(&skipped));
                    if let Some(f) = &fallback {
                        tracing::warn!(provider = link.as_str(), skipped = %f, "answered by a fallback provider");
                    }
                    let tokens = answer.tokens.unwrap_or_else(|| {
                        // No usage reported: estimate, so budgets and history still count.
                        sandbox::estimate_tokens(&req.prompt)
                            + req
                                .system
                                .as_deref()
                                .map(sandbox::estimate_tokens)
                                .unwrap_or(0)
                            + sandbox::estimate_tokens(&answer.text)
                    });
                    // A cut-off answer is not kept: the next call may well finish.
                    if let Some(k) = key.filter(|_| !is_truncation(answer.finish_reason.as_deref()))
                    {
                        self.cache_put(k, link, &model, &answer.text, tokens);
                    }
                    let reply = LlmReply {
                        text: answer.text,
                        tokens_used: Some(tokens),
                        provider: link.as_str().to_string(),
                        model,
                        cached: false,
                        fallback,
                        reply_model: answer.model,
                        finish_reason: answer.finish_reason,
                    };
                    if reply.model_differs() {
                        tracing::warn!(
                            provider = link.as_str(),
                            requested = %reply.model,
                            answered = reply.reply_model.as_deref().unwrap_or(""),
                            "the server answered with another model than the one asked for"
                        );
                    }
                    return Ok(reply);
                }
                Err(e) if chain.len() > 1 && i + 1 < chain.len() && falls_through(e.kind) => {
                    tracing::warn!(provider = link.as_str(), kind = %e.kind, error = %e.message, "provider unavailable, trying the next one");
                    skipped.push((link, e));
                }
                Err(e) if skipped.is_empty() => return Err(e),
                Err(e) if !falls_through(e.kind) => {
                    // This link is up but the call failed: its own kind decides the retry.
                    return Err(StepError {
                        message: format!("{} (after: {})", e.message, describe_skips(&skipped)),
                        ..e
                    });
                }
                Err(e) => {
                    skipped.push((link, e));
                    return Err(chain_error(skipped));
                }
            }
        }
        Err(chain_error(skipped))
    }

    /// The links to try for a node's `provider`.
    /// `use_ollama` overrides `USE_OLLAMA`.
    pub fn chain(&self, provider: &str, use_ollama: Option<bool>) -> Result<Vec<Link>, StepError> {
        let c = &self.config;
        match ProviderName::parse(provider) {
            Some(ProviderName::Auto) => {
                let mut links = Vec::new();
                if use_ollama.unwrap_or(c.use_ollama) {
                    links.push(Link::Ollama);
                }
                if c.huggingface_token.is_some() {
                    links.push(Link::HuggingFace);
                }
                if c.openai_base_url.is_some() {
                    links.push(Link::OpenAi);
                }
                if links.is_empty() {
                    return Err(self.no_provider_error());
                }
                Ok(links)
            }
            Some(ProviderName::HuggingFace) => Ok(vec![Link::HuggingFace]),
            Some(ProviderName::HfInference) => Ok(vec![Link::HfInference]),
            Some(ProviderName::Ollama) => Ok(vec![Link::Ollama]),
            Some(ProviderName::OpenAi) => Ok(vec![Link::OpenAi]),
            // The simulated model never reaches a chain (it is answered before).
            Some(ProviderName::Sandbox) | None => Err(StepError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "unknown provider {provider:?}: use one of {}",
                    ProviderName::list()
                ),
            )),
        }
    }

    /// The model id a link is asked for: aliases (`fast`, `better`, `powerful`) become the
    /// configured ids; on Ollama a known HF id becomes its Ollama name, and in an `auto` chain
    /// any other HF-style id (`org/name`) becomes `OLLAMA_MODEL`; in an `auto` chain the
    /// OpenAI-compatible server gets `OPENAI_MODEL` when set. A node's explicit model on an
    /// explicit provider is sent as written.
    pub fn model_for(&self, link: Link, requested: &str, auto: bool) -> String {
        let c = &self.config;
        let resolved = match requested {
            "fast" => c.model_fast.clone(),
            "better" => c.model_better.clone(),
            "powerful" => c.model_powerful.clone(),
            other => other.to_string(),
        };
        match link {
            Link::HuggingFace | Link::HfInference => resolved,
            Link::Ollama => {
                let known = MODEL_TABLE
                    .iter()
                    .zip([&c.model_fast, &c.model_better, &c.model_powerful])
                    .find(|((_, id, _), configured)| {
                        *id == resolved || configured.as_str() == resolved
                    })
                    .map(|((_, _, ollama), _)| ollama.to_string());
                match known {
                    // The fast model is the configured Ollama default.
                    Some(m) if m == "mistral" => c.ollama_model.clone(),
                    Some(m) => m,
                    None if auto && resolved.contains('/') && !resolved.starts_with("hf.co/") => {
                        c.ollama_model.clone()
                    }
                    None => resolved,
                }
            }
            Link::OpenAi if auto => c.openai_model.clone().unwrap_or(resolved),
            Link::OpenAi => resolved,
        }
    }

    async fn call_link(
        &self,
        link: Link,
        req: &LlmRequest,
        model: &str,
        progress: Progress<'_>,
        admitted: Option<limiter::Grant>,
        slot: Option<slots::Slot>,
    ) -> Result<Answer, StepError> {
        let c = &self.config;
        let chat = Chat {
            model,
            system: req.system.as_deref(),
            prompt: &req.prompt,
            temperature: req.temperature,
            max_tokens: req.max_tokens,
        };
        // Checked before waiting for the limiter: a missing token fails at once.
        let token = match link {
            Link::HuggingFace | Link::HfInference => {
                Some(huggingface::token(c.huggingface_token.as_deref())?)
            }
            _ => None,
        };
        if link == Link::OpenAi && c.openai_base_url.is_none() {
            return Err(StepError::new(
                ErrorKind::Config,
                "OPENAI_BASE_URL is not set: point it at an OpenAI-compatible server (e.g. \
                 http://localhost:8080/v1 for llama-server, http://localhost:11434/v1 for \
                 Ollama) in .env",
            ));
        }
        // A call that took no place among the provider's calls in flight ahead (the library
        // call, a fallback link) waits for one here.
        let _slot = match slot {
            Some(s) => Some(s),
            None => match self.slot_limit(link).await {
                Some(l) => l.take().await,
                None => None,
            },
        };
        let limiter = self.limiter(link);
        // A place taken ahead is used if it still holds; otherwise wait here as usual.
        if !admitted.is_some_and(limiter::Grant::redeem) {
            limiter.acquire().await;
        }
        if let Some(rates) = &self.fleet_rates {
            let (name, limit) = match link {
                Link::Ollama => ("ollama", c.ollama_rate_limit),
                Link::HuggingFace | Link::HfInference => ("huggingface", c.hf_rate_limit),
                Link::OpenAi => ("openai", c.openai_rate_limit),
            };
            if let Some(limit) = limit {
                let per = crate::limits::scale(limit.per, c.time_scale);
                rates.acquire(name, limit, per).await;
            }
        }
        let result = match link {
            Link::Ollama => ollama::complete(&self.http, &c.ollama_url, &chat, progress).await,
            Link::HuggingFace => {
                huggingface::chat(
                    &self.http,
                    &c.hf_inference_url,
                    token.unwrap_or_default(),
                    &chat,
                    progress,
                )
                .await
            }
            Link::HfInference => {
                huggingface::text_generation(
                    &self.http,
                    &c.hf_inference_url,
                    token.unwrap_or_default(),
                    &chat,
                )
                .await
            }
            Link::OpenAi => {
                let url = openai::chat_url(c.openai_base_url.as_deref().unwrap_or_default());
                openai::complete(
                    &self.http,
                    Link::OpenAi,
                    &url,
                    c.openai_api_key.as_deref(),
                    &chat,
                    progress,
                )
                .await
            }
        };
        match result {
            Err(e) if e.kind == ErrorKind::RateLimited => {
                // The whole provider waits, not just this call: every other call to it queues
                // in `acquire` instead of collecting its own 429.
                let wait = e.retry_after.unwrap_or(crate::retry::RATE_LIMIT_DEFAULT);
                limiter.pause_for(c.scaled(wait));
                Err(e)
            }
            Ok(a) if a.text.trim().is_empty() => Err(StepError::new(
                ErrorKind::EmptyOutput,
                format!(
                    "{} returned an empty answer for model {model}; retrying (if it persists, \
                     raise maxTokens or try another model)",
                    link.label()
                ),
            )),
            other => other,
        }
    }

    async fn cache_get(&self, key: &str) -> Option<CachedAnswer> {
        let store = self.store.clone()?;
        let key = key.to_string();
        // Store reads are blocking SQLite calls: off the async workers.
        let found =
            tokio::task::spawn_blocking(move || store.cache_get(&key, SystemTime::now())).await;
        match found {
            Ok(Ok(hit)) => hit,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "response cache unreadable; calling the model");
                None
            }
            Err(_) => None,
        }
    }

    fn cache_put(&self, key: String, link: Link, model: &str, output: &str, tokens: u64) {
        if let Some(store) = &self.store {
            let now = SystemTime::now();
            store.cache_put(CachedAnswer {
                key,
                provider: link.as_str().to_string(),
                model: model.to_string(),
                output: output.to_string(),
                tokens_used: tokens,
                created_at: now,
                expires_at: now + self.config.cache_ttl,
            });
        }
    }

    pub(crate) fn no_provider_error(&self) -> StepError {
        StepError::new(
            ErrorKind::Config,
            "no model provider is configured: set HUGGINGFACE_TOKEN in .env (create a read \
             token at https://huggingface.co/settings/tokens), or USE_OLLAMA=true with a local \
             `ollama serve`, or OPENAI_BASE_URL for an OpenAI-compatible server — or try the \
             blueprint first with --sandbox",
        )
    }
}

fn describe_skips(skipped: &[(Link, StepError)]) -> String {
    skipped
        .iter()
        .map(|(l, e)| format!("{l} skipped ({}: {})", e.kind, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every link failed: the message lists each; the kind is a retryable one if any link's was
/// (a retry may find it back), else the last link's.
fn chain_error(skipped: Vec<(Link, StepError)>) -> StepError {
    let kind = skipped
        .iter()
        .map(|(_, e)| e.kind)
        .find(|k| k.retry_class() == RetryClass::Retry)
        .or_else(|| skipped.last().map(|(_, e)| e.kind))
        .unwrap_or(ErrorKind::Config);
    let retry_after = skipped
        .iter()
        .filter(|(_, e)| e.kind == kind)
        .find_map(|(_, e)| e.retry_after);
    StepError {
        kind,
        message: format!(
            "every provider failed — {}",
            skipped
                .iter()
                .map(|(l, e)| format!("{l}: {}: {}", e.kind, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        retry_after,
    }
}

/// The cache key: 128 bits of two independent FNV-1a hashes over the call's identity
/// (provider as requested, model as requested, messages, parameters), as 32 hex digits.
pub fn cache_key(req: &LlmRequest) -> String {
    let identity = serde_json::json!([
        req.provider,
        req.model,
        req.system,
        req.prompt,
        req.temperature,
        req.max_tokens
    ])
    .to_string();
    let a = sandbox::fnv(identity.as_bytes());
    let rev: Vec<u8> = identity.bytes().rev().collect();
    let b = sandbox::fnv(&rev) ^ 0x9E37_79B9_7F4A_7C15;
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The warning that a server answered with another model than the one asked for: only
    /// when it named one, and not for the same model spelled with Ollama's `:latest`.
    #[test]
    fn a_reply_from_another_model_is_told_apart_from_the_same_one() {
        let reply = |answered: Option<&str>| LlmReply {
            text: String::new(),
            tokens_used: None,
            provider: "ollama".into(),
            model: "llama3.2".into(),
            cached: false,
            fallback: None,
            reply_model: answered.map(str::to_string),
            finish_reason: None,
        };
        assert!(reply(Some("mistral")).model_differs());
        assert!(!reply(Some("llama3.2:latest")).model_differs());
        assert!(!reply(Some("llama3.2")).model_differs());
        assert!(!reply(None).model_differs());
    }

    fn providers(vars: &[(&str, &str)]) -> Providers {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Providers::new(Arc::new(Config::from_vars(&vars).unwrap()))
    }

    #[test]
    fn the_auto_chain_follows_the_configuration() {
        let p = providers(&[]);
        assert_eq!(p.chain("auto", None).unwrap_err().kind, ErrorKind::Config);
        assert_eq!(p.chain("auto", Some(true)).unwrap(), vec![Link::Ollama]);
        let p = providers(&[
            ("USE_OLLAMA", "true"),
            ("HF_TOKEN", "hf_x"),
            ("OPENAI_BASE_URL", "http://x/v1"),
        ]);
        assert_eq!(
            p.chain("auto", None).unwrap(),
            vec![Link::Ollama, Link::HuggingFace, Link::OpenAi]
        );
        assert_eq!(
            p.chain("auto", Some(false)).unwrap(),
            vec![Link::HuggingFace, Link::OpenAi]
        );
        assert_eq!(p.chain("ollama", None).unwrap(), vec![Link::Ollama]);
        assert_eq!(
            p.chain("nope", None).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
    }

    #[test]
    fn aliases_and_ollama_names() {
        let p = providers(&[("OLLAMA_MODEL", "neural-chat")]);
        assert_eq!(
            p.model_for(Link::HuggingFace, "fast", true),
            "mistralai/Mistral-7B-Instruct-v0.2"
        );
        assert_eq!(
            p.model_for(Link::HuggingFace, "powerful", true),
            "meta-llama/Meta-Llama-3-8B-Instruct"
        );
        assert_eq!(
            p.model_for(Link::Ollama, DEFAULT_MODEL, true),
            "neural-chat"
        );
        assert_eq!(p.model_for(Link::Ollama, "better", false), "llama2");
        assert_eq!(p.model_for(Link::Ollama, "org/other", true), "neural-chat");
        assert_eq!(p.model_for(Link::Ollama, "org/other", false), "org/other");
        assert_eq!(p.model_for(Link::Ollama, "llama3.2", true), "llama3.2");
        assert_eq!(
            p.model_for(Link::HuggingFace, "deepseek-ai/DeepSeek-V3:fastest", true),
            "deepseek-ai/DeepSeek-V3:fastest"
        );
    }

    #[test]
    fn cache_keys_change_with_every_part() {
        let r = LlmRequest {
            provider: "auto".into(),
            model: "m".into(),
            system: None,
            prompt: "p".into(),
            temperature: Some(0.2),
            max_tokens: None,
            subject: None,
        };
        let k = cache_key(&r);
        // Keys are kept in the history database: a later build computing them differently
        // would miss every answer cached before the upgrade. (FNV-1a 64 of
        // `["auto","m",null,"p",0.2,null]`, then of its bytes reversed xor 0x9E3779B97F4A7C15,
        // as a reference FNV-1a written apart from this one computes them.)
        assert_eq!(k, "e71fb0323503cbb72151c2e70f681322");
        assert_eq!(k, cache_key(&r.clone()));
        for changed in [
            LlmRequest {
                prompt: "q".into(),
                ..r.clone()
            },
            LlmRequest {
                temperature: Some(0.3),
                ..r.clone()
            },
            LlmRequest {
                system: Some("s".into()),
                ..r.clone()
            },
            LlmRequest {
                provider: "ollama".into(),
                ..r.clone()
            },
        ] {
            assert_ne!(cache_key(&changed), k);
        }
    }

    #[test]
    fn chain_errors_prefer_a_retryable_kind() {
        let e = chain_error(vec![
            (Link::Ollama, StepError::new(ErrorKind::Network, "down")),
            (
                Link::HuggingFace,
                StepError::new(ErrorKind::CreditsExhausted, "402"),
            ),
        ]);
        assert_eq!(e.kind, ErrorKind::Network);
        assert!(e.message.contains("ollama: network: down"));
        assert!(e.message.contains("huggingface: credits_exhausted: 402"));
    }
}
