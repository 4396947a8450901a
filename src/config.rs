//! Configuration is read here and nowhere else: environment variables, also from `.env` in the
//! working directory (dotenvy). Each value is checked once, with a message that says what was
//! expected.

use crate::blueprint::{Channel, MissedSlots};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Everything OmniFlow reads from its environment. `Config::default()` is the configuration
/// of an empty environment: every documented default.
#[derive(Clone)]
pub struct Config {
    pub huggingface_token: Option<String>,
    pub hf_inference_url: String,
    pub use_ollama: bool,
    pub ollama_url: String,
    pub openai_base_url: Option<String>,
    pub openai_api_key: Option<String>,
    /// Per model call (`REQUEST_TIMEOUT`, seconds).
    pub request_timeout: Duration,
    /// Retries after the first try (`MAX_RETRIES`).
    pub max_retries: u32,
    pub telegram_bot_token: Option<String>,
    pub telegram_chat_id: Option<String>,
    pub telegram_api_url: String,
    pub discord_webhook: Option<String>,
    pub db_file: PathBuf,
    /// `DATABASE_URL` as given: `postgres://…` puts the history (and, for a fleet, the queue)
    /// in PostgreSQL instead of `DB_FILE`. Kept raw so that a bad value is reported where the
    /// store opens, with its fix; it may hold a password, so it is never printed (see
    /// [`Config::database`] and [`crate::store::PgTarget::shown`]).
    pub database_url: Option<String>,
    pub log_dir: PathBuf,
    pub supabase_url: Option<String>,
    pub supabase_key: Option<String>,
    /// Steps in flight at once (`CONCURRENCY`).
    pub concurrency: usize,
    pub memory_threshold_mb: u64,
    /// Latency of the sandbox's simulated model (`SANDBOX_LATENCY_MS`); `None` = realistic,
    /// varying per prompt.
    pub sandbox_latency: Option<Duration>,
    /// Multiplies every wait (backoff, provider hints, simulated latency, delays):
    /// `OMNIFLOW_TIME_SCALE=0.01` makes tests of the real binary fast. Default 1.
    pub time_scale: f64,
    /// A run whose owner has not heartbeated for this long may be taken over
    /// (`LEASE_TIMEOUT`, seconds; heartbeats come every third of it).
    pub lease_timeout: Duration,
    /// Claims of a run whose process died before the run is failed instead (`MAX_TAKEOVERS`).
    pub max_takeovers: u32,
    /// On SIGTERM, how long steps in flight may take to finish (`SHUTDOWN_GRACE`, seconds).
    pub shutdown_grace: Duration,
    // ---- notifications and schedules ----
    /// Channels told when a run succeeds, for blueprints without their own `notify`
    /// (`NOTIFY_ON_SUCCESS=telegram,discord`). Default: none.
    pub notify_on_success: Vec<Channel>,
    /// Channels told when a run fails, for blueprints without their own `notify`
    /// (`NOTIFY_ON_FAILURE`). Default: none.
    pub notify_on_failure: Vec<Channel>,
    /// Channels that get one digest after `run --all-active` (`NOTIFY_DIGEST`). Default: none.
    pub notify_digest: Vec<Channel>,
    /// Missed schedule slots, for blueprints that do not say (`SCHEDULE_MISSED=skip|run-once`).
    pub schedule_missed: MissedSlots,
    // ---- providers ------------------------------------------------------------
    /// The model aliases `fast`, `better`, `powerful` (`MODEL_FAST`, `MODEL_BETTER`,
    /// `MODEL_POWERFUL`); defaults are the original's table.
    pub model_fast: String,
    pub model_better: String,
    pub model_powerful: String,
    /// The Ollama model used when an HF model id goes to Ollama (`OLLAMA_MODEL`, `mistral`).
    pub ollama_model: String,
    /// The model asked of the OpenAI-compatible server in the `auto` chain (`OPENAI_MODEL`);
    /// `None` sends the node's model.
    pub openai_model: Option<String>,
    /// How long a cached model answer is reused (`CACHE_TTL`: `24h`, `30m`, seconds; `0`
    /// turns the cache off). Default 24 h.
    pub cache_ttl: Duration,
    /// Token budget of a run when the blueprint sets no `maxTokensPerRun`
    /// (`MAX_TOKENS_PER_RUN`); `None` = unlimited.
    pub max_tokens_per_run: Option<u64>,
    /// Request-rate limits per provider (`HF_RATE_LIMIT` default 60/min, `OLLAMA_RATE_LIMIT`
    /// and `OPENAI_RATE_LIMIT` default unlimited); `None` = unlimited.
    pub hf_rate_limit: Option<RateLimit>,
    pub ollama_rate_limit: Option<RateLimit>,
    pub openai_rate_limit: Option<RateLimit>,
    /// Most calls in flight per provider (`OLLAMA_CONCURRENCY`, `HF_CONCURRENCY`,
    /// `OPENAI_CONCURRENCY`): `None` = not set, `Some(0)` = unlimited. Unset means unlimited,
    /// except on the OpenAI-compatible server, which is asked for its slot count (llama-server's
    /// `GET /props` `total_slots`).
    pub ollama_concurrency: Option<usize>,
    pub hf_concurrency: Option<usize>,
    pub openai_concurrency: Option<usize>,
    /// Size budgets of templates, fan-outs, blueprints and variables (`TEMPLATE_FUEL`,
    /// `TEMPLATE_MAX_OUTPUT`, `TEMPLATE_MAX_VALUE`, `MAX_ITEMS`, `MAX_NODES`,
    /// `MAX_VARIABLE_BYTES`, `MAX_BLUEPRINT_BYTES`).
    pub limits: crate::limits::Limits,
    // ---- metrics and health ---------------------------------------------------------------
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`OMNIFLOW_LISTEN`, or `--listen`);
    /// `None` = off. A bare port means loopback; any other interface must be named.
    pub listen: Option<std::net::SocketAddr>,
    /// Bearer token the listener requires (`OMNIFLOW_METRICS_TOKEN`); `None` = no token.
    pub metrics_token: Option<String>,
    // ---- the fleet ----------------------------------------------------------------------
    /// Which tagged steps this process takes (`OMNIFLOW_TAGS=gpu,eu`): a step whose every tag
    /// is here. Untagged steps go to any process. Sorted, lowercase, without duplicates.
    pub tags: Vec<String>,
}

impl std::fmt::Debug for Config {
    // Secrets are never printed, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Config")
            .field("huggingface_token", &set(&self.huggingface_token))
            .field("hf_inference_url", &self.hf_inference_url)
            .field("use_ollama", &self.use_ollama)
            .field("ollama_url", &self.ollama_url)
            .field("openai_base_url", &self.openai_base_url)
            .field("openai_api_key", &set(&self.openai_api_key))
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("telegram_bot_token", &set(&self.telegram_bot_token))
            .field("telegram_chat_id", &self.telegram_chat_id)
            .field("telegram_api_url", &self.telegram_api_url)
            .field("discord_webhook", &set(&self.discord_webhook))
            .field("db_file", &self.db_file)
            .field(
                "database_url",
                &self.database_url.as_deref().map(|u| {
                    crate::store::PgTarget::parse(u)
                        .map(|t| t.shown().to_string())
                        .unwrap_or_else(|_| "<set, not a valid PostgreSQL URL>".into())
                }),
            )
            .field("log_dir", &self.log_dir)
            .field("concurrency", &self.concurrency)
            .field("memory_threshold_mb", &self.memory_threshold_mb)
            .field("sandbox_latency", &self.sandbox_latency)
            .field("time_scale", &self.time_scale)
            .field("lease_timeout", &self.lease_timeout)
            .field("max_takeovers", &self.max_takeovers)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("supabase_url", &self.supabase_url)
            .field("supabase_key", &set(&self.supabase_key))
            .field("notify_on_success", &self.notify_on_success)
            .field("notify_on_failure", &self.notify_on_failure)
            .field("notify_digest", &self.notify_digest)
            .field("schedule_missed", &self.schedule_missed)
            .field("model_fast", &self.model_fast)
            .field("model_better", &self.model_better)
            .field("model_powerful", &self.model_powerful)
            .field("ollama_model", &self.ollama_model)
            .field("openai_model", &self.openai_model)
            .field("cache_ttl", &self.cache_ttl)
            .field("max_tokens_per_run", &self.max_tokens_per_run)
            .field("hf_rate_limit", &self.hf_rate_limit)
            .field("ollama_rate_limit", &self.ollama_rate_limit)
            .field("openai_rate_limit", &self.openai_rate_limit)
            .field("ollama_concurrency", &self.ollama_concurrency)
            .field("hf_concurrency", &self.hf_concurrency)
            .field("openai_concurrency", &self.openai_concurrency)
            .field("limits", &self.limits)
            .field("listen", &self.listen)
            .field("metrics_token", &set(&self.metrics_token))
            .field("tags", &self.tags)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        // An empty environment holds no value that could be invalid.
        Config::from_vars(&HashMap::new())
            .unwrap_or_else(|e| unreachable!("the defaults are valid: {e}"))
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?} is not valid: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl Config {
    /// Where the history lives: PostgreSQL when `DATABASE_URL` is set, else SQLite at
    /// `DB_FILE`. A `DATABASE_URL` that is set but unusable is an error worded with its fix
    /// (never a quiet fall back to SQLite: a process on the wrong database would split the
    /// fleet's history). The error never repeats the URL's password.
    pub fn database(&self) -> Result<crate::store::Location, String> {
        match &self.database_url {
            None => Ok(crate::store::Location::Sqlite(self.db_file.clone())),
            Some(url) => crate::store::PgTarget::parse(url).map(|t| {
                let t = t.with_pool_size(crate::store::pg::connect::pool_size(self.concurrency));
                crate::store::Location::Postgres(Box::new(t))
            }),
        }
    }

    /// Reads `.env` (if present, without overriding variables already set) and the environment.
    pub fn load() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        Config::from_vars(&std::env::vars().collect())
    }

    /// Builds a configuration from explicit variables (tests use this; nothing global).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |k: &str| {
            vars.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let parse_u64 = |k: &'static str, default: u64, min: u64| -> Result<u64, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => Err(ConfigError {
                        var: k,
                        value: v,
                        expected: "a whole number (at least 1 where it is a count or a size)",
                    }),
                },
            }
        };
        let parse_bool = |k: &'static str| -> Result<bool, ConfigError> {
            match get(k).map(|v| v.to_ascii_lowercase()) {
                None => Ok(false),
                Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => Ok(true),
                Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => Ok(false),
                Some(v) => Err(ConfigError {
                    var: k,
                    value: v,
                    expected: "true or false",
                }),
            }
        };
        let time_scale = match get("OMNIFLOW_TIME_SCALE") {
            None => 1.0,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => x,
                _ => {
                    return Err(ConfigError {
                        var: "OMNIFLOW_TIME_SCALE",
                        value: v,
                        expected: "a positive number (1 = real time)",
                    })
                }
            },
        };
        let channels = |k: &'static str| -> Result<Vec<Channel>, ConfigError> {
            let mut out = Vec::new();
            for part in get(k).unwrap_or_default().split(',') {
                let c = match part.trim().to_ascii_lowercase().as_str() {
                    "" | "none" => continue,
                    "telegram" => Channel::Telegram,
                    "discord" => Channel::Discord,
                    _ => {
                        return Err(ConfigError {
                            var: k,
                            value: get(k).unwrap_or_default(),
                            expected: "a comma-separated list of telegram, discord (or none)",
                        })
                    }
                };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
            Ok(out)
        };
        let schedule_missed = match get("SCHEDULE_MISSED").map(|v| v.to_ascii_lowercase()) {
            None => MissedSlots::Skip,
            Some(v) if v == "skip" => MissedSlots::Skip,
            Some(v) if ["run-once", "runonce", "run_once", "once"].contains(&v.as_str()) => {
                MissedSlots::RunOnce
            }
            Some(v) => {
                return Err(ConfigError {
                    var: "SCHEDULE_MISSED",
                    value: v,
                    expected: "skip or run-once",
                })
            }
        };
        let rate = |k: &'static str,
                    default: Option<RateLimit>|
         -> Result<Option<RateLimit>, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some(v) => RateLimit::parse(&v).map_err(|expected| ConfigError {
                    var: k,
                    value: v,
                    expected,
                }),
            }
        };
        let cache_ttl = match get("CACHE_TTL") {
            None => Duration::from_secs(24 * 3600),
            Some(v) => match v.parse::<u64>() {
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => humantime::parse_duration(&v).map_err(|_| ConfigError {
                    var: "CACHE_TTL",
                    value: v.clone(),
                    expected:
                        "a duration such as 24h, 30m or 3600 (seconds); 0 turns the cache off",
                })?,
            },
        };
        let in_flight = |k: &'static str| -> Result<Option<usize>, ConfigError> {
            match get(k).map(|v| v.to_ascii_lowercase()) {
                None => Ok(None),
                Some(v) if ["off", "none", "unlimited"].contains(&v.as_str()) => Ok(Some(0)),
                Some(v) => v.parse::<usize>().map(Some).map_err(|_| ConfigError {
                    var: k,
                    value: v,
                    expected: "a number of calls in flight (0 or off = unlimited)",
                }),
            }
        };
        let max_tokens_per_run = match get("MAX_TOKENS_PER_RUN") {
            None => None,
            Some(_) => Some(parse_u64("MAX_TOKENS_PER_RUN", 0, 1)?),
        };
        let size = |k: &'static str, default: usize| -> Result<usize, ConfigError> {
            parse_u64(k, default as u64, 1).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        };
        let limits = crate::limits::Limits {
            template_fuel: parse_u64("TEMPLATE_FUEL", crate::limits::DEFAULT_TEMPLATE_FUEL, 1)?,
            template_max_output: size(
                "TEMPLATE_MAX_OUTPUT",
                crate::limits::DEFAULT_TEMPLATE_MAX_OUTPUT,
            )?,
            template_max_value: size(
                "TEMPLATE_MAX_VALUE",
                crate::limits::DEFAULT_TEMPLATE_MAX_VALUE,
            )?,
            max_items: size("MAX_ITEMS", crate::limits::DEFAULT_MAX_ITEMS)?,
            max_nodes: size("MAX_NODES", crate::limits::DEFAULT_MAX_NODES)?,
            max_variable_bytes: size(
                "MAX_VARIABLE_BYTES",
                crate::limits::DEFAULT_MAX_VARIABLE_BYTES,
            )?,
            max_blueprint_bytes: size(
                "MAX_BLUEPRINT_BYTES",
                crate::limits::DEFAULT_MAX_BLUEPRINT_BYTES,
            )?,
        };
        let listen = match get("OMNIFLOW_LISTEN") {
            None => None,
            Some(v) => Some(parse_listen(&v).map_err(|expected| ConfigError {
                var: "OMNIFLOW_LISTEN",
                value: v,
                expected,
            })?),
        };
        let tags = match get("OMNIFLOW_TAGS") {
            None => Vec::new(),
            Some(v) => parse_tags(&v).map_err(|expected| ConfigError {
                var: "OMNIFLOW_TAGS",
                value: v,
                expected,
            })?,
        };
        Ok(Config {
            database_url: get("DATABASE_URL"),
            tags,
            limits,
            listen,
            metrics_token: get("OMNIFLOW_METRICS_TOKEN"),
            model_fast: get("MODEL_FAST").unwrap_or_else(|| crate::models::MODEL_TABLE[0].1.into()),
            model_better: get("MODEL_BETTER")
                .unwrap_or_else(|| crate::models::MODEL_TABLE[1].1.into()),
            model_powerful: get("MODEL_POWERFUL")
                .unwrap_or_else(|| crate::models::MODEL_TABLE[2].1.into()),
            ollama_model: get("OLLAMA_MODEL").unwrap_or_else(|| "mistral".into()),
            openai_model: get("OPENAI_MODEL"),
            cache_ttl,
            max_tokens_per_run,
            hf_rate_limit: rate("HF_RATE_LIMIT", Some(RateLimit::per_minute(60)))?,
            ollama_rate_limit: rate("OLLAMA_RATE_LIMIT", None)?,
            openai_rate_limit: rate("OPENAI_RATE_LIMIT", None)?,
            ollama_concurrency: in_flight("OLLAMA_CONCURRENCY")?,
            hf_concurrency: in_flight("HF_CONCURRENCY")?,
            openai_concurrency: in_flight("OPENAI_CONCURRENCY")?,
            huggingface_token: get("HUGGINGFACE_TOKEN").or_else(|| get("HF_TOKEN")),
            hf_inference_url: get("HF_INFERENCE_URL")
                .unwrap_or_else(|| "https://router.huggingface.co".into()),
            use_ollama: parse_bool("USE_OLLAMA")?,
            ollama_url: get("OLLAMA_URL").unwrap_or_else(|| "http://localhost:11434".into()),
            openai_base_url: get("OPENAI_BASE_URL"),
            openai_api_key: get("OPENAI_API_KEY"),
            request_timeout: Duration::from_secs(parse_u64("REQUEST_TIMEOUT", 300, 1)?),
            max_retries: parse_u64("MAX_RETRIES", 3, 0)?.min(100) as u32,
            telegram_bot_token: get("TELEGRAM_BOT_TOKEN"),
            telegram_chat_id: get("TELEGRAM_CHAT_ID"),
            telegram_api_url: get("TELEGRAM_API_URL")
                .unwrap_or_else(|| "https://api.telegram.org".into()),
            discord_webhook: get("DISCORD_WEBHOOK").or_else(|| get("DISCORD_WEBHOOK_URL")),
            db_file: get("DB_FILE")
                .unwrap_or_else(|| "./automation_runner.db".into())
                .into(),
            log_dir: get("LOG_DIR").unwrap_or_else(|| "./logs".into()).into(),
            supabase_url: get("SUPABASE_URL"),
            supabase_key: get("SUPABASE_KEY"),
            concurrency: parse_u64("CONCURRENCY", crate::pool::DEFAULT_CONCURRENCY as u64, 1)?
                .min(4096) as usize,
            memory_threshold_mb: parse_u64("MEMORY_THRESHOLD_MB", 500, 1)?,
            sandbox_latency: match get("SANDBOX_LATENCY_MS") {
                None => None,
                Some(_) => Some(Duration::from_millis(parse_u64(
                    "SANDBOX_LATENCY_MS",
                    0,
                    0,
                )?)),
            },
            time_scale,
            lease_timeout: Duration::from_secs(parse_u64("LEASE_TIMEOUT", 30, 1)?),
            max_takeovers: parse_u64("MAX_TAKEOVERS", 3, 0)?.min(1000) as u32,
            shutdown_grace: Duration::from_secs(parse_u64("SHUTDOWN_GRACE", 30, 0)?),
            notify_on_success: channels("NOTIFY_ON_SUCCESS")?,
            notify_on_failure: channels("NOTIFY_ON_FAILURE")?,
            notify_digest: channels("NOTIFY_DIGEST")?,
            schedule_missed,
        })
    }

    /// Every secret value in the configuration, for redaction of logs and messages.
    ///
    /// `DATABASE_URL`'s password is kept out by construction (`PgTarget` never shows it).
    pub fn secrets(&self) -> Vec<String> {
        [
            &self.huggingface_token,
            &self.openai_api_key,
            &self.telegram_bot_token,
            &self.discord_webhook,
            &self.supabase_key,
            &self.metrics_token,
        ]
        .into_iter()
        .flatten()
        .cloned()
        // A webhook URL's last segment is its token: redact it alone too, in case a URL is
        // shown re-encoded or with its query.
        .chain(
            self.discord_webhook
                .as_deref()
                .and_then(|u| u.split('?').next())
                .and_then(|u| u.trim_end_matches('/').rsplit('/').next())
                .filter(|t| t.len() >= 16)
                .map(str::to_string),
        )
        .filter(|s| s.len() >= 4)
        .collect()
    }

    /// Scales a wait by `time_scale`.
    pub fn scaled(&self, d: Duration) -> Duration {
        if self.time_scale == 1.0 {
            d
        } else {
            crate::limits::scale(d, self.time_scale)
        }
    }
}

/// What `parse_listen` accepts, for error messages.
pub const LISTEN_EXPECTED: &str = "a port (9464, on loopback) or an address with a port \
(127.0.0.1:9464, [::1]:9464, or 0.0.0.0:9464 to listen on every interface)";

/// The listener's address: a bare port (`9464`, `:9464`) is loopback; `localhost:PORT` is
/// 127.0.0.1; anything else must be an IP address with a port, so a non-loopback interface is
/// only ever used when it is written out.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, &'static str> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let s = s.trim();
    let port = |p: &str| p.parse::<u16>().map_err(|_| LISTEN_EXPECTED);
    if let Some(p) = s.strip_prefix(':') {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port(p)?));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port(s)?));
    }
    if let Some(p) = s.strip_prefix("localhost:") {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port(p)?));
    }
    s.parse::<SocketAddr>().map_err(|_| LISTEN_EXPECTED)
}

/// "`requests` per `per`", e.g. 60 per minute. Parsed from `60/min`, `10/s`, `5/2s`, or a bare
/// number (per minute); `0`, `none`, `off` or `unlimited` mean no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

impl RateLimit {
    pub fn per_minute(n: u32) -> RateLimit {
        RateLimit {
            requests: n,
            per: Duration::from_secs(60),
        }
    }

    /// `None` for "unlimited"; `Err` with what was expected.
    pub fn parse(text: &str) -> Result<Option<RateLimit>, &'static str> {
        const EXPECTED: &str =
            "a rate such as 60/min, 10/s or 5/2s (a bare number is per minute; 0 or off = unlimited)";
        let t = text.trim().to_ascii_lowercase();
        if ["0", "none", "off", "unlimited", "false"].contains(&t.as_str()) {
            return Ok(None);
        }
        let (n, unit) = t.split_once('/').unwrap_or((t.as_str(), "min"));
        let requests: u32 = n.trim().parse().map_err(|_| EXPECTED)?;
        if requests == 0 {
            return Ok(None);
        }
        let unit = unit.trim();
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| EXPECTED)?,
        };
        if per.is_zero() {
            return Err(EXPECTED);
        }
        Ok(Some(RateLimit { requests, per }))
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.requests,
            humantime::format_duration(self.per)
        )
    }
}

/// `gpu, EU` → `["eu", "gpu"]`: tags are names of letters, digits, `-` and `_`.
pub fn parse_tags(text: &str) -> Result<Vec<String>, &'static str> {
    const EXPECTED: &str =
        "comma-separated tags of letters, digits, - and _ (e.g. gpu,eu), at most 64 characters each";
    let mut tags = Vec::new();
    for t in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let ok = t.len() <= 64
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(EXPECTED);
        }
        tags.push(t.to_ascii_lowercase());
    }
    tags.sort();
    tags.dedup();
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn database_url_selects_postgres_and_never_shows_its_password() {
        let c = Config::from_vars(&vars(&[("DB_FILE", "h.db")])).unwrap();
        assert!(matches!(
            c.database(),
            Ok(crate::store::Location::Sqlite(p)) if p == std::path::Path::new("h.db")
        ));
        let c = Config::from_vars(&vars(&[(
            "DATABASE_URL",
            "postgres://fleet:Hunter2Secret@db.example:5432/omniflow",
        )]))
        .unwrap();
        let Ok(crate::store::Location::Postgres(t)) = c.database() else {
            panic!("a postgres:// URL means PostgreSQL");
        };
        assert_eq!(t.shown(), "postgres://fleet:***@db.example:5432/omniflow");
        let shown = format!("{c:?}");
        assert!(!shown.contains("Hunter2Secret"), "{shown}");
        assert!(shown.contains("postgres://fleet:***@db.example"), "{shown}");

        // Set but not PostgreSQL: an error naming the fix, never SQLite, never the password.
        let c =
            Config::from_vars(&vars(&[("DATABASE_URL", "mysql://u:Hunter2Secret@h/db")])).unwrap();
        let err = c.database().unwrap_err();
        assert!(err.contains("not postgres://"), "{err}");
        assert!(!err.contains("Hunter2Secret"), "{err}");
        assert!(!format!("{c:?}").contains("Hunter2Secret"));
    }

    #[test]
    fn the_default_config_is_the_empty_environment() {
        let d = Config::default();
        assert_eq!(d.concurrency, 40);
        assert_eq!(d.time_scale, 1.0);
        assert_eq!(
            format!("{d:?}"),
            format!("{:?}", Config::from_vars(&HashMap::new()).unwrap())
        );
    }

    #[test]
    fn debug_shows_every_setting_and_no_secret() {
        let c = Config::from_vars(&vars(&[
            ("HUGGINGFACE_TOKEN", "hf-secret-1"),
            ("OPENAI_API_KEY", "sk-secret-2"),
            ("TELEGRAM_BOT_TOKEN", "tg-secret-3"),
            ("DISCORD_WEBHOOK", "https://discord.example/secret-4"),
            ("SUPABASE_KEY", "sb-secret-5"),
        ]))
        .unwrap();
        let text = format!("{c:?}");
        for secret in ["secret-1", "secret-2", "secret-3", "secret-4", "secret-5"] {
            assert!(!text.contains(secret), "{text}");
        }
        for field in [
            "telegram_api_url",
            "sandbox_latency",
            "time_scale",
            "lease_timeout",
            "max_takeovers",
            "shutdown_grace",
            "model_better",
            "model_powerful",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert!(!text.contains(".."), "{text}");
    }

    #[test]
    fn tags_are_read_sorted_lowercase_and_checked() {
        let c = Config::from_vars(&vars(&[("OMNIFLOW_TAGS", " GPU, eu,gpu ,")])).unwrap();
        assert_eq!(c.tags, ["eu", "gpu"]);
        assert!(Config::default().tags.is_empty());
        let e = Config::from_vars(&vars(&[("OMNIFLOW_TAGS", "gpu box")])).unwrap_err();
        assert!(e.to_string().contains("OMNIFLOW_TAGS"), "{e}");
        // The fleet's URL never shows in debug output (it may hold a password).
        let c = Config::from_vars(&vars(&[(
            "DATABASE_URL",
            "postgres://u:hunter2@db.example/x",
        )]))
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_vars(&HashMap::new()).unwrap();
        assert_eq!(c.concurrency, 40);
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.request_timeout, Duration::from_secs(300));
        assert_eq!(c.memory_threshold_mb, 500);
        assert_eq!(c.db_file, PathBuf::from("./automation_runner.db"));
        assert_eq!(c.log_dir, PathBuf::from("./logs"));
        assert_eq!(c.hf_inference_url, "https://router.huggingface.co");
        assert!(!c.use_ollama);
    }

    #[test]
    fn hf_token_is_an_alias_and_secrets_never_print() {
        let c = Config::from_vars(&vars(&[("HF_TOKEN", "hf_secret123")])).unwrap();
        assert_eq!(c.huggingface_token.as_deref(), Some("hf_secret123"));
        assert!(!format!("{c:?}").contains("hf_secret123"));
        assert_eq!(c.secrets(), vec!["hf_secret123".to_string()]);
    }

    #[test]
    fn provider_settings_parse_with_defaults() {
        let c = Config::from_vars(&HashMap::new()).unwrap();
        assert_eq!(c.cache_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_tokens_per_run, None);
        assert_eq!(c.hf_rate_limit, Some(RateLimit::per_minute(60)));
        assert_eq!(c.ollama_rate_limit, None);
        assert_eq!(c.ollama_model, "mistral");
        let c = Config::from_vars(&vars(&[
            ("CACHE_TTL", "30m"),
            ("MAX_TOKENS_PER_RUN", "5000"),
            ("HF_RATE_LIMIT", "off"),
            ("OLLAMA_RATE_LIMIT", "10/s"),
        ]))
        .unwrap();
        assert_eq!(c.cache_ttl, Duration::from_secs(1800));
        assert_eq!(c.max_tokens_per_run, Some(5000));
        assert_eq!(c.hf_rate_limit, None);
        assert_eq!(c.ollama_rate_limit.unwrap().requests, 10);
        let c = Config::from_vars(&vars(&[
            ("OPENAI_CONCURRENCY", "2"),
            ("OLLAMA_CONCURRENCY", "off"),
        ]))
        .unwrap();
        assert_eq!(c.openai_concurrency, Some(2));
        assert_eq!(c.ollama_concurrency, Some(0));
        assert_eq!(c.hf_concurrency, None);
        let e = Config::from_vars(&vars(&[("HF_CONCURRENCY", "many")])).unwrap_err();
        assert!(e.to_string().contains("HF_CONCURRENCY"), "{e}");
        let e = Config::from_vars(&vars(&[("HF_RATE_LIMIT", "fast")])).unwrap_err();
        assert!(e.to_string().contains("HF_RATE_LIMIT"), "{e}");
    }

    #[test]
    fn the_listener_is_loopback_unless_an_address_is_written_out() {
        let c = Config::from_vars(&HashMap::new()).unwrap();
        assert_eq!(c.listen, None, "off by default");
        for (given, want) in [
            ("9464", "127.0.0.1:9464"),
            (":9464", "127.0.0.1:9464"),
            ("localhost:9464", "127.0.0.1:9464"),
            ("[::1]:9464", "[::1]:9464"),
            ("0.0.0.0:9464", "0.0.0.0:9464"),
        ] {
            assert_eq!(parse_listen(given).unwrap().to_string(), want, "{given}");
        }
        for bad in [
            "",
            "metrics",
            "0.0.0.0",
            "127.0.0.1:99999",
            "host.example:9464",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        let e = Config::from_vars(&vars(&[("OMNIFLOW_LISTEN", "everywhere")])).unwrap_err();
        assert!(e.to_string().contains("OMNIFLOW_LISTEN"), "{e}");
        let c = Config::from_vars(&vars(&[("OMNIFLOW_METRICS_TOKEN", "scrape-secret-1")])).unwrap();
        assert!(c.secrets().contains(&"scrape-secret-1".to_string()));
        assert!(!format!("{c:?}").contains("scrape-secret-1"));
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let e = Config::from_vars(&vars(&[("CONCURRENCY", "lots")])).unwrap_err();
        assert!(e.to_string().contains("CONCURRENCY=\"lots\""), "{e}");
        let e = Config::from_vars(&vars(&[("USE_OLLAMA", "maybe")])).unwrap_err();
        assert!(e.to_string().contains("true or false"), "{e}");
    }
}
