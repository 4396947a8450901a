//! Model names: the default model, the original's alias table, and how a requested name
//! compares with the one a server says answered. Below configuration, the store and the
//! providers, which all need them.

/// The default model when neither the node nor the blueprint's defaults name one
/// (the original's "fast" choice).
pub const DEFAULT_MODEL: &str = "mistralai/Mistral-7B-Instruct-v0.2";

/// The original's model table: alias → Hugging Face id (overridable with `MODEL_FAST`,
/// `MODEL_BETTER`, `MODEL_POWERFUL`) and the Ollama model each maps to when the call goes to
/// Ollama.
pub const MODEL_TABLE: [(&str, &str, &str); 3] = [
    ("fast", "mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    ("better", "meta-llama/Llama-2-7b-chat-hf", "llama2"),
    ("powerful", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
];

/// Whether the model a server says answered is the one asked for. Ollama answers `llama3.2`
/// for `llama3.2:latest` and the other way round; llama-server names its file path.
pub fn same_model(requested: &str, answered: &str) -> bool {
    let base = |m: &str| {
        m.trim()
            .strip_suffix(":latest")
            .unwrap_or(m.trim())
            .to_string()
    };
    base(requested) == base(answered)
}
