//! `/healthz` (liveness) and `/readyz` (readiness): the status code a Kubernetes probe or a
//! Docker healthcheck acts on, and a JSON body that says why. The bodies name conditions and
//! configuration variables, never a secret, a path with credentials, or anything a run
//! produced.

use crate::engine::Engine;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

/// The maintenance loop turns every second (scaled); this long without a turn means the
/// process's loops are stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// How long the store writer may take to acknowledge a flush before it counts as stuck.
pub const STORE_ANSWER: Duration = Duration::from_secs(5);

/// An answer: ok (200) or not (503), and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub ok: bool,
    pub body: Value,
}

/// Liveness: the maintenance loop (heartbeats, the memory hold) turned recently.
pub fn liveness(engine: &Engine, now: SystemTime) -> Verdict {
    match engine.last_loop_turn() {
        None => Verdict {
            ok: false,
            body: json!({ "status": "starting",
                "reason": "the maintenance loop has not turned yet" }),
        },
        Some(t) => {
            let age = now.duration_since(t).unwrap_or_default();
            if age > STALE_AFTER {
                Verdict {
                    ok: false,
                    body: json!({ "status": "stalled",
                        "reason": format!("the maintenance loop last turned {}s ago (limit {}s): the process is stuck", age.as_secs(), STALE_AFTER.as_secs()),
                        "lastTurnAgeMs": age.as_millis() as u64 }),
                }
            } else {
                Verdict {
                    ok: true,
                    body: json!({ "status": "ok", "lastTurnAgeMs": age.as_millis() as u64 }),
                }
            }
        }
    }
}

/// Which model providers this process can use: configured ones, or the simulated model of a
/// sandbox daemon.
pub fn providers(engine: &Engine, sandbox: bool) -> Vec<&'static str> {
    let c = engine.config();
    let mut out = Vec::new();
    use crate::blueprint::ProviderName;
    if c.use_ollama {
        out.push(ProviderName::Ollama.as_str());
    }
    if c.huggingface_token.is_some() {
        out.push(ProviderName::HuggingFace.as_str());
    }
    if c.openai_base_url.is_some() {
        out.push(ProviderName::OpenAi.as_str());
    }
    if sandbox {
        out.push(ProviderName::Sandbox.as_str());
    }
    out
}

/// Readiness: the store takes writes, the pool takes work, and a model provider is there.
pub async fn readiness(engine: &Engine, sandbox: bool) -> Verdict {
    let mut reasons: Vec<String> = Vec::new();
    let store = engine.store();
    let answered = tokio::time::timeout(STORE_ANSWER, store.flush()).await;
    let store_check = match (answered, store.write_problem()) {
        (Err(_), _) => {
            let r = format!(
                "the history database did not take a write within {}s (another process may hold its lock, or the disk is slow)",
                STORE_ANSWER.as_secs()
            );
            reasons.push(r.clone());
            r
        }
        (Ok(()), Some(e)) => {
            let r = format!("the history database is not writable: {e}");
            reasons.push(r.clone());
            r
        }
        (Ok(()), None) => "ok".to_string(),
    };
    let stats = engine.pool().stats();
    let pool_check = if engine.is_draining() {
        "shutting down: no new work".to_string()
    } else if stats.memory_hold {
        format!(
            "held: memory is above MEMORY_THRESHOLD_MB={} (rss {} MB); the pool takes no new work until it falls",
            engine.config().memory_threshold_mb,
            crate::engine::rss_mb().map_or("?".into(), |m| format!("{m:.0}"))
        )
    } else if stats.paused {
        "paused: resume it in the console (p)".to_string()
    } else {
        "ok".to_string()
    };
    if pool_check != "ok" {
        reasons.push(format!("pool {pool_check}"));
    }
    let providers = providers(engine, sandbox);
    let provider_check = if providers.is_empty() {
        let r = "no model provider is configured: set HUGGINGFACE_TOKEN, USE_OLLAMA=true or OPENAI_BASE_URL (`omniflow doctor` checks them)".to_string();
        reasons.push(r.clone());
        r
    } else {
        "ok".to_string()
    };
    let ok = reasons.is_empty();
    Verdict {
        ok,
        body: json!({
            "status": if ok { "ready" } else { "not ready" },
            "reasons": reasons,
            "checks": {
                "store": store_check,
                "pool": pool_check,
                "providers": provider_check,
                // Lost log lines do not stop work, so they do not make the process unready;
                // an operator probing it still sees them.
                "logs": crate::logging::write_problem().unwrap_or_else(|| "ok".to_string()),
            },
            "providers": providers,
        }),
    }
}
