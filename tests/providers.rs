//! The real provider clients (reqwest) against local fake servers that follow PROTOCOLS.md:
//! Hugging Face router and hf-inference, Ollama, an OpenAI-compatible server; every documented
//! error reply, truncated streams, bad bodies; the fallback chain, the cache, budgets, rate
//! limits, replay, and a blueprint run end to end.

mod common;
mod fake_provider;

use fake_provider::{refused_url, start, Reply};
use omniflow::config::Config;
use omniflow::engine::RunRequest;
use omniflow::error::{ErrorKind, StepError};
use omniflow::events::{Event, RunStatus};
use omniflow::providers::{
    library, AttemptKey, CallOptions, Link, LlmReply, LlmRequest, Providers,
};
use omniflow::store::Store;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn config(vars: &[(&str, &str)]) -> Config {
    let mut m: HashMap<String, String> = HashMap::new();
    m.insert("OMNIFLOW_TIME_SCALE".into(), "0.001".into());
    m.insert("HF_RATE_LIMIT".into(), "off".into());
    for (k, v) in vars {
        m.insert(k.to_string(), v.to_string());
    }
    Config::from_vars(&m).unwrap()
}

fn providers(vars: &[(&str, &str)]) -> Providers {
    Providers::new(Arc::new(config(vars)))
}

fn req(provider: &str, model: &str) -> LlmRequest {
    LlmRequest {
        provider: provider.into(),
        model: model.into(),
        system: Some("Be brief.".into()),
        prompt: "Two sentences on rust.".into(),
        temperature: Some(0.2),
        max_tokens: Some(64),
        subject: None,
    }
}

async fn call(p: &Providers, r: &LlmRequest) -> Result<LlmReply, StepError> {
    let mut o = CallOptions::new(AttemptKey {
        step: "s",
        attempt: 1,
    });
    o.cache = false;
    p.complete_with(r, o).await
}

async fn hf(reply: Reply) -> (fake_provider::Fake, Providers) {
    let fake = start(move |_, _| reply.clone()).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    (fake, p)
}

// ---- Hugging Face router --------------------------------------------------------------------

#[tokio::test]
async fn hf_router_streams_sse_to_done_with_live_token_counts() {
    let (fake, p) = hf(Reply::sse(&["Rust ", "is ", "fast."], Some(46), true)).await;
    let live = AtomicU64::new(0);
    let progress = |n: u64| {
        live.store(n, Ordering::SeqCst);
    };
    let mut o = CallOptions::new(AttemptKey {
        step: "s",
        attempt: 1,
    });
    o.progress = Some(&progress);
    let r = p
        .complete_with(&req("huggingface", "deepseek-ai/DeepSeek-V3:fastest"), o)
        .await
        .unwrap();
    assert_eq!(r.text, "Rust is fast.");
    assert_eq!(r.tokens_used, Some(46), "from usage");
    assert_eq!(r.provider, "huggingface");
    assert_eq!(
        r.model, "deepseek-ai/DeepSeek-V3:fastest",
        "suffix passes through"
    );
    assert_eq!(
        live.load(Ordering::SeqCst),
        3,
        "one progress tick per chunk"
    );
    let seen = &fake.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.header("authorization"), Some("Bearer hf_testtoken123"));
    let body = seen.json();
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["model"], json!("deepseek-ai/DeepSeek-V3:fastest"));
    assert_eq!(body["messages"][0]["role"], json!("system"));
    assert_eq!(
        body["messages"][1]["content"],
        json!("Two sentences on rust.")
    );
    assert_eq!(body["max_tokens"], json!(64));
}

#[tokio::test]
async fn an_sse_stream_without_done_is_truncated() {
    let (_f, p) = hf(Reply::sse(&["Rust ", "is"], None, false)).await;
    let e = call(&p, &req("huggingface", "m")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::TruncatedStream, "{e}");
    assert!(e.message.contains("[DONE]"), "{e}");
}

#[tokio::test]
async fn a_json_answer_to_a_stream_request_is_accepted_and_usage_counts() {
    let (_f, p) = hf(Reply::completion("Hello there.", 12)).await;
    let r = call(&p, &req("huggingface", "m")).await.unwrap();
    assert_eq!(r.text, "Hello there.");
    assert_eq!(r.tokens_used, Some(12));
}

#[tokio::test]
async fn both_hf_error_shapes_and_every_documented_status() {
    let not_supported = Reply::json(
        400,
        json!({"error":{"message":"The requested model 'x/y' is not supported by any provider you have enabled.","type":"invalid_request_error","param":"model","code":"model_not_supported"}}),
    );
    let cases: Vec<(Reply, ErrorKind, &str)> = vec![
        (
            not_supported,
            ErrorKind::ModelNotSupported,
            "inference-providers",
        ),
        (
            Reply::json(
                429,
                json!({"error":"Rate limit reached. You reached free usage limit (reset hourly)."}),
            )
            .with_header("Retry-After", "7"),
            ErrorKind::RateLimited,
            "retry after 7s",
        ),
        (
            Reply::json(429, json!({"error":"Rate limit reached."})),
            ErrorKind::RateLimited,
            "USE_OLLAMA=true",
        ),
        (
            Reply::json(
                401,
                json!({"error":"Invalid credentials in Authorization header"}),
            ),
            ErrorKind::Auth,
            "https://huggingface.co/settings/tokens",
        ),
        (
            Reply::json(403, json!({"error":{"message":"missing permission"}})),
            ErrorKind::Auth,
            "Make calls to Inference Providers",
        ),
        (
            Reply::json(
                402,
                json!({"error":"You have exceeded your monthly included credits"}),
            ),
            ErrorKind::CreditsExhausted,
            "USE_OLLAMA=true",
        ),
        (
            Reply::json(500, json!({"detail":"internal"})),
            ErrorKind::Server,
            "internal",
        ),
        (
            Reply::json(503, json!({"error":"Service Unavailable"})),
            ErrorKind::Server,
            "Service Unavailable",
        ),
        (
            Reply::raw(
                502,
                "text/html",
                "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            ),
            ErrorKind::Server,
            "502 Bad Gateway",
        ),
        (
            Reply::raw(
                200,
                "text/html",
                "<!DOCTYPE html><html><title>Login</title></html>",
            ),
            ErrorKind::BadResponse,
            "HTML",
        ),
        (
            Reply::raw(200, "application/json", "{\"choices\": [ {\"message\": "),
            ErrorKind::BadResponse,
            "malformed JSON",
        ),
        (
            Reply::json(408, json!({"error":"Request Timeout"})),
            ErrorKind::Timeout,
            "timed out the request (HTTP 408",
        ),
        // A gateway's HTML page in front of the API: its status still decides the kind.
        (
            Reply::raw(
                429,
                "text/html",
                "<html><head><title>429 Too Many Requests</title></head></html>",
            ),
            ErrorKind::RateLimited,
            "429 Too Many Requests",
        ),
        (
            Reply::raw(
                401,
                "text/html",
                "<html><head><title>401 Authorization Required</title></head></html>",
            ),
            ErrorKind::Auth,
            "401 Authorization Required",
        ),
        (
            Reply::raw(
                403,
                "text/html",
                "<html><head><title>403 Forbidden</title></head></html>",
            ),
            ErrorKind::Auth,
            "403 Forbidden",
        ),
        (Reply::completion("   ", 3), ErrorKind::EmptyOutput, "empty"),
        (Reply::Huge(9 * 1024 * 1024), ErrorKind::BadResponse, "MiB"),
    ];
    for (reply, kind, needle) in cases {
        let label = format!("{reply:?}").chars().take(80).collect::<String>();
        let (_f, p) = hf(reply).await;
        let e = call(&p, &req("huggingface", "x/y")).await.unwrap_err();
        assert_eq!(e.kind, kind, "{label}: {e}");
        assert!(e.message.contains(needle), "{label}: {e}");
        assert!(
            !e.message.contains("hf_testtoken123"),
            "no token in messages"
        );
        if kind == ErrorKind::RateLimited && needle.contains("7s") {
            assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        }
    }
}

#[tokio::test]
async fn a_retry_after_http_date_becomes_the_wait_until_then() {
    let at = chrono::Utc::now() + chrono::Duration::seconds(40);
    let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let (_f, p) =
        hf(Reply::json(429, json!({"error":"Rate limit reached."}))
            .with_header("Retry-After", &date))
        .await;
    let e = call(&p, &req("huggingface", "x/y")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::RateLimited);
    let wait = e.retry_after.expect("the date is read as a wait");
    // Whole seconds in the header, and some time passes before it is read.
    assert!(
        wait > Duration::from_secs(25) && wait <= Duration::from_secs(40),
        "{wait:?} from {date}"
    );
}

/// A server that reports no usage: the tokens are estimated from the system prompt, the
/// prompt and the answer (a quarter of their characters each, rounded up), so budgets and
/// the history still count them.
#[tokio::test]
async fn without_reported_usage_the_tokens_are_estimated_from_prompt_and_answer() {
    let answer = "An answer of forty-four characters, exactly.";
    let fake = start(move |_, _| {
        Reply::json(
            200,
            json!({"id":"x","object":"chat.completion","created":1,"model":"m",
                   "choices":[{"index":0,"message":{"role":"assistant","content":answer},
                               "finish_reason":"stop"}]}),
        )
    })
    .await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    let r = LlmRequest {
        prompt: "Twelve chars".into(),
        ..req("huggingface", "m")
    };
    let reply = call(&p, &r).await.unwrap();
    assert_eq!(reply.text, answer);
    // "Be brief." 9 characters → 3 tokens, the prompt 12 → 3, the answer 44 → 11.
    assert_eq!(reply.tokens_used, Some(3 + 3 + 11));
}

/// A long answer (2 MB, well under the 8 MiB reply cap, read in many chunks) arrives whole.
#[tokio::test]
async fn a_long_answer_under_the_reply_cap_arrives_whole() {
    let long = "word ".repeat(400_000);
    let answer = long.clone();
    let fake = start(move |_, _| Reply::completion(&answer, 5)).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    let r = call(&p, &req("huggingface", "m")).await.unwrap();
    assert_eq!(r.text.len(), long.len());
    assert_eq!(r.text, long);
}

#[tokio::test]
async fn hf_inference_503_loading_waits_the_float_estimated_time() {
    let fake = start(|_, i| {
        if i == 0 {
            Reply::json(
                503,
                json!({"error":"Model mistralai/Mistral-7B-Instruct-v0.2 is currently loading","estimated_time":2.5}),
            )
        } else {
            Reply::json(200, json!([{"generated_text":"Loaded and answering."}]))
        }
    })
    .await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    let r = req("hf-inference", "fast");
    let e = call(&p, &r).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::ModelLoading);
    assert_eq!(e.retry_after, Some(Duration::from_secs_f64(2.5)));
    assert!(e.message.contains("normal"), "{e}");
    assert!(e.message.contains("2.5s"), "{e}");
    let ok = call(&p, &r).await.unwrap();
    assert_eq!(ok.text, "Loaded and answering.");
    assert_eq!(ok.provider, "hf-inference");
    let seen = &fake.requests()[0];
    assert_eq!(
        seen.path, "/hf-inference/models/mistralai/Mistral-7B-Instruct-v0.2",
        "the alias resolves to the original's fast model"
    );
    assert_eq!(seen.json()["parameters"]["max_new_tokens"], json!(64));
    assert_eq!(seen.json()["parameters"]["return_full_text"], json!(false));
}

/// An hf-inference text-generation call has no separate system prompt: the system prompt
/// goes before the prompt in `inputs`, and a blank one adds nothing.
#[tokio::test]
async fn hf_inference_puts_the_system_prompt_before_the_prompt() {
    let fake = start(|_, _| Reply::json(200, json!([{"generated_text":"ok"}]))).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    let mut r = req("hf-inference", "fast");
    call(&p, &r).await.unwrap();
    r.system = Some("  \n".into());
    call(&p, &r).await.unwrap();
    let inputs: Vec<serde_json::Value> = fake
        .requests()
        .iter()
        .map(|s| s.json()["inputs"].clone())
        .collect();
    assert_eq!(
        inputs,
        [
            json!("Be brief.\n\nTwo sentences on rust."),
            json!("Two sentences on rust.")
        ]
    );
}

#[tokio::test]
async fn a_missing_token_gives_the_original_message() {
    let p = providers(&[]);
    let e = call(&p, &req("huggingface", "m")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Config);
    assert!(e.message.starts_with("HUGGINGFACE_TOKEN not found"), "{e}");
    assert!(e.message.contains("https://huggingface.co/settings/tokens"));
    assert!(e.message.contains(".env"));
    // And with nothing configured, auto says what to set and suggests --sandbox.
    let e = call(&p, &req("auto", "m")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Config);
    assert!(e.message.contains("--sandbox"), "{e}");
}

#[tokio::test]
async fn a_server_that_never_answers_is_dropped_by_the_timeout() {
    let (fake, p) = hf(Reply::Hang).await;
    let r = req("huggingface", "m");
    let out = tokio::time::timeout(Duration::from_millis(300), call(&p, &r)).await;
    assert!(
        out.is_err(),
        "the call is still waiting when the timeout fires"
    );
    // Dropping the future closed the connection: nothing of the client outlived it.
    // Up to 10 s: a loaded machine can be slow to notice the closed socket.
    for _ in 0..1000 {
        if fake.dropped_by_client.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.dropped_by_client.load(Ordering::SeqCst), 1);
}

// ---- Ollama -----------------------------------------------------------------------------

#[tokio::test]
async fn ollama_ndjson_ends_with_done_and_counts_tokens() {
    let fake = start(|_, _| Reply::ndjson(&["Hello", " from", " Ollama."], true)).await;
    let p = providers(&[("OLLAMA_URL", &fake.url)]);
    let r = call(&p, &req("ollama", "fast")).await.unwrap();
    assert_eq!(r.text, "Hello from Ollama.");
    assert_eq!(
        r.tokens_used,
        Some(26 + 298),
        "prompt_eval_count + eval_count"
    );
    assert_eq!(r.provider, "ollama");
    assert_eq!(
        r.model, "mistral",
        "the fast alias maps to the Ollama default"
    );
    // What the server said about its answer, from the final object: kept in the history,
    // and `length` would mean a cut-off answer.
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.reply_model.as_deref(), Some("mistral"));
    assert!(!r.truncated() && !r.model_differs());
    let seen = &fake.requests()[0];
    assert_eq!(seen.path, "/api/chat");
    assert_eq!(seen.json()["options"]["num_predict"], json!(64));
    assert_eq!(seen.json()["options"]["temperature"], json!(0.2));
}

/// An Ollama stream past the 8 MiB reply cap is refused rather than held in memory: a
/// runaway model (or the wrong server at OLLAMA_URL) cannot fill the process's memory.
#[tokio::test]
async fn an_ollama_stream_past_the_reply_cap_is_refused() {
    // Nine lines of 1 MiB each.
    let piece = "x".repeat(1 << 20);
    let pieces: Vec<&str> = std::iter::repeat_n(piece.as_str(), 9).collect();
    let reply = Reply::ndjson(&pieces, true);
    let fake = start(move |_, _| reply.clone()).await;
    let p = providers(&[("OLLAMA_URL", &fake.url)]);
    let e = match call(&p, &req("ollama", "fast")).await {
        Ok(r) => panic!("an answer of {} bytes was taken", r.text.len()),
        Err(e) => e,
    };
    assert_eq!(e.kind, ErrorKind::BadResponse, "{e}");
    assert!(e.message.contains("sent more than 8 MiB"), "{e}");
    assert!(e.message.contains("OLLAMA_URL"), "{e}");
}

#[tokio::test]
async fn ollama_without_done_is_truncated_and_a_missing_model_says_pull() {
    let fake = start(|_, _| Reply::ndjson(&["Hello"], false)).await;
    let p = providers(&[("OLLAMA_URL", &fake.url)]);
    let e = call(&p, &req("ollama", "llama3.2")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::TruncatedStream, "{e}");
    assert!(e.message.contains("done:true"), "{e}");

    let fake = start(|_, _| {
        Reply::json(
            404,
            json!({"error":"model \"llama3.2\" not found, try pulling it first"}),
        )
    })
    .await;
    let p = providers(&[("OLLAMA_URL", &fake.url)]);
    let e = call(&p, &req("ollama", "llama3.2")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::ModelNotSupported);
    assert!(
        e.message
            .starts_with("model llama3.2 not found — run: ollama pull llama3.2"),
        "{e}"
    );
}

#[tokio::test]
async fn ollama_refused_lists_the_three_fixes() {
    let p = providers(&[("OLLAMA_URL", &refused_url().await)]);
    let e = call(&p, &req("ollama", "mistral")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Network);
    assert!(e.message.contains("Ollama connection failed"), "{e}");
    for fix in [
        "ollama serve",
        "docker compose up ollama",
        "USE_OLLAMA=false",
    ] {
        assert!(e.message.contains(fix), "{fix}: {e}");
    }
}

// ---- OpenAI-compatible ------------------------------------------------------------------

#[tokio::test]
async fn openai_compatible_sse_with_a_key_and_its_own_error_shape() {
    let fake = start(|s, _| {
        if s.header("authorization") == Some("Bearer sk-local") {
            Reply::sse(&["llama", ".cpp"], Some(9), true)
        } else {
            Reply::json(401, json!({"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}))
        }
    })
    .await;
    let base = format!("{}/v1", fake.url);
    let p = providers(&[("OPENAI_BASE_URL", &base), ("OPENAI_API_KEY", "sk-local")]);
    let r = call(&p, &req("openai", "local")).await.unwrap();
    assert_eq!((r.text.as_str(), r.tokens_used), ("llama.cpp", Some(9)));
    // (Before it, the client asked `/props` for llama-server's slot count.)
    assert_eq!(fake.requests().last().unwrap().path, "/v1/chat/completions");

    let p = providers(&[("OPENAI_BASE_URL", &base), ("OPENAI_API_KEY", "wrong")]);
    let e = call(&p, &req("openai", "local")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Auth);
    assert!(e.message.contains("OPENAI_API_KEY"), "{e}");
    assert!(!e.message.contains("wrong"));
}

// ---- the auto chain, cache, rate limits -------------------------------------------------

#[tokio::test]
async fn auto_falls_back_from_a_down_ollama_to_hugging_face() {
    let fake = start(|_, _| Reply::sse(&["from HF"], Some(5), true)).await;
    let p = providers(&[
        ("USE_OLLAMA", "true"),
        ("OLLAMA_URL", &refused_url().await),
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    let r = call(&p, &req("auto", "fast")).await.unwrap();
    assert_eq!(r.provider, "huggingface");
    assert_eq!(r.model, "mistralai/Mistral-7B-Instruct-v0.2");
    let f = r.fallback.expect("the skipped link is recorded");
    assert!(
        f.starts_with("ollama skipped (network: Ollama connection failed"),
        "{f}"
    );

    // Both down: one error listing both; network is retryable so the kind stays network.
    let p = providers(&[
        ("USE_OLLAMA", "true"),
        ("OLLAMA_URL", &refused_url().await),
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &refused_url().await),
    ]);
    let e = call(&p, &req("auto", "fast")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Network);
    assert!(
        e.message.contains("ollama: network") && e.message.contains("huggingface: network"),
        "{e}"
    );

    // Ollama down, Hugging Face up but refusing this call: its own error decides, and says
    // which link was skipped before it.
    let limited = start(|_, _| Reply::json(429, json!({"error":"Rate limit reached."}))).await;
    let p = providers(&[
        ("USE_OLLAMA", "true"),
        ("OLLAMA_URL", &refused_url().await),
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &limited.url),
    ]);
    let e = call(&p, &req("auto", "fast")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::RateLimited);
    assert!(
        e.message.contains("Rate limit reached")
            && e.message
                .contains("(after: ollama skipped (network: Ollama connection failed"),
        "{e}"
    );
}

/// `Providers::complete`, the call without options (the library's): the configured
/// provider's answer, or the simulated model's when one is given.
#[tokio::test]
async fn complete_answers_from_the_provider_or_the_simulated_model() {
    let (_f, p) = hf(Reply::completion("an answer from the router", 6)).await;
    let key = AttemptKey {
        step: "s",
        attempt: 1,
    };
    let r = p
        .complete(&req("huggingface", "x/y"), key, None)
        .await
        .unwrap();
    assert_eq!(r.text, "an answer from the router");
    assert_eq!(r.provider, "huggingface");
    assert_eq!(r.tokens_used, Some(6));
    let sim = omniflow::providers::sandbox::SimulatedModel::new(0.0, 3, Some(Duration::ZERO));
    let r = p
        .complete(&req("huggingface", "x/y"), key, Some(&sim))
        .await
        .unwrap();
    assert_eq!(r.provider, "sandbox");
    assert!(!r.text.is_empty());
}

/// `doctor` on an OpenAI-compatible server (llama-server): the slot count it reports, or the
/// configured cap, and whether the 1-token completion was answered by another model.
#[tokio::test]
async fn doctor_names_the_servers_slots_or_the_configured_cap() {
    let fake = start(|s, _| {
        if s.path.ends_with("/props") {
            Reply::json(200, json!({ "total_slots": 4 }))
        } else if s.path.ends_with("/models") {
            Reply::json(
                200,
                json!({ "data": [{ "id": "m" }, { "id": "local-model" }] }),
            )
        } else {
            // Answers as model "m" whatever was asked.
            Reply::completion("OK", 2)
        }
    })
    .await;
    let base = format!("{}/v1", fake.url);
    let detail = |vars: Vec<(&'static str, String)>| {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let p = providers(&vars);
        async move {
            let checks = p.doctor().await;
            let c = checks.iter().find(|c| c.provider == "openai").unwrap();
            assert_eq!(c.ok, Some(true), "{}", c.detail);
            c.detail.clone()
        }
    };
    let d = detail(vec![
        ("OPENAI_BASE_URL", base.clone()),
        ("OPENAI_MODEL", "m".into()),
    ])
    .await;
    assert!(
        d.contains("the server has 4 slots (its /props total_slots)"),
        "{d}"
    );
    assert!(
        d.contains("a 1-token completion on model m answered") && !d.contains("answered by"),
        "{d}"
    );
    let d = detail(vec![
        ("OPENAI_BASE_URL", base.clone()),
        ("OPENAI_MODEL", "local-model".into()),
        ("OPENAI_CONCURRENCY", "2".into()),
    ])
    .await;
    assert!(
        d.contains("at most 2 calls in flight (OPENAI_CONCURRENCY)") && !d.contains("/props"),
        "{d}"
    );
    assert!(
        d.contains("model local-model answered, answered by m"),
        "{d}"
    );
}

#[tokio::test]
async fn credits_exhausted_falls_through_but_a_rate_limit_does_not() {
    let hf_fake = start(|_, _| Reply::json(402, json!({"error":"credits exhausted"}))).await;
    let oa = start(|_, _| Reply::completion("from the local server", 4)).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &hf_fake.url),
        ("OPENAI_BASE_URL", &oa.url),
        ("OPENAI_MODEL", "local-model"),
    ]);
    let r = call(&p, &req("auto", "fast")).await.unwrap();
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("openai", "local-model")
    );
    assert!(r.fallback.unwrap().contains("credits_exhausted"));

    let hf_fake = start(|_, _| Reply::json(429, json!({"error":"Rate limit reached"}))).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &hf_fake.url),
        ("OPENAI_BASE_URL", &oa.url),
    ]);
    let e = call(&p, &req("auto", "fast")).await.unwrap_err();
    assert_eq!(
        e.kind,
        ErrorKind::RateLimited,
        "a per-call failure is retried, not skipped"
    );
    // …and the whole provider is paused for it.
    assert!(p.paused_for(Link::HuggingFace) > Duration::ZERO);
    assert_eq!(p.paused_for(Link::OpenAi), Duration::ZERO);
}

#[tokio::test]
async fn an_identical_second_call_is_answered_by_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("h.db")).unwrap();
    let fake = start(|_, _| Reply::sse(&["cached ", "answer"], Some(20), true)).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ])
    .with_store(store.clone());
    let key = AttemptKey {
        step: "s",
        attempt: 1,
    };
    let r = req("huggingface", "m");
    let first = p.complete_with(&r, CallOptions::new(key)).await.unwrap();
    assert!(!first.cached);
    store.flush().await;
    let second = p.complete_with(&r, CallOptions::new(key)).await.unwrap();
    assert!(second.cached);
    assert_eq!(second.text, "cached answer");
    assert_eq!(
        second.tokens_used,
        Some(0),
        "a cached answer costs no new tokens"
    );
    assert_eq!(second.provider, "huggingface");
    assert_eq!(fake.count(), 1, "the second call made no request");

    // A different prompt, or the cache turned off, goes to the model.
    let other = LlmRequest {
        prompt: "Other.".into(),
        ..r.clone()
    };
    assert!(
        !p.complete_with(&other, CallOptions::new(key))
            .await
            .unwrap()
            .cached
    );
    let mut off = CallOptions::new(key);
    off.cache = false;
    assert!(!p.complete_with(&r, off).await.unwrap().cached);
    assert_eq!(fake.count(), 3);
    // A retry (refresh) skips the cached answer but reaches the model.
    let mut retry = CallOptions::new(AttemptKey {
        step: "s",
        attempt: 2,
    });
    retry.refresh = true;
    assert!(!p.complete_with(&r, retry).await.unwrap().cached);
    assert_eq!(fake.count(), 4);

    // Expired entries are not served.
    let p0 = Providers::new(Arc::new(config(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
        ("CACHE_TTL", "0"),
    ])))
    .with_store(store.clone());
    assert!(
        !p0.complete_with(&r, CallOptions::new(key))
            .await
            .unwrap()
            .cached
    );
}

/// 40 parallel calls through a provider whose fake enforces a quota and answers 429 beyond
/// it: with the limiter configured to the quota, not one 429, and the calls arrive in four
/// windows of ten.
///
/// On tokio's paused clock, and time moves only when the test moves it: a blocking task
/// holds off tokio's automatic advance, and the test advances one window once the fake has
/// seen the whole of the previous one. So an arrival is stamped with the exact time of its
/// grant, however slow or fast the machine, and a limit not applied shows as more than ten
/// calls at one instant.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn forty_parallel_calls_with_the_limit_matching_the_quota_get_no_429() {
    const QUOTA: usize = 10;
    const WINDOW: Duration = Duration::from_millis(500);
    let log: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>> = Default::default();
    let rejected = Arc::new(AtomicU64::new(0));
    let (arrived_tx, mut arrived) = tokio::sync::watch::channel(0usize);
    let (l, rj) = (log.clone(), rejected.clone());
    let fake = start(move |seen, _| {
        let mut log = l.lock().unwrap();
        let in_window = log
            .iter()
            .filter(|t| seen.at.duration_since(**t) < WINDOW)
            .count();
        arrived_tx.send_modify(|n| *n += 1);
        if in_window >= QUOTA {
            rj.fetch_add(1, Ordering::SeqCst);
            return Reply::json(429, json!({"error":"Rate limit reached"}));
        }
        log.push(seen.at);
        Reply::completion("ok", 2)
    })
    .await;
    // Holds off the automatic advance while it runs (tokio does not advance a paused clock
    // while a blocking task is in progress); it returns when told to, or after a minute of
    // real time, which fails the test instead of hanging it.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let mut watchdog =
        tokio::task::spawn_blocking(move || stopped.recv_timeout(Duration::from_secs(60)).is_ok());
    let p = Providers::new(Arc::new(config(&[
        ("OMNIFLOW_TIME_SCALE", "1"),
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
        ("HF_RATE_LIMIT", "10/500ms"),
    ])));
    let t0 = tokio::time::Instant::now();
    let mut hs = Vec::new();
    for i in 0..40 {
        let p = p.clone();
        hs.push(tokio::spawn(async move {
            let r = LlmRequest {
                prompt: format!("topic {i}"),
                ..req("huggingface", "m")
            };
            call(&p, &r).await
        }));
    }
    for window in 1..=4 {
        tokio::select! {
            r = arrived.wait_for(|n| *n >= window * QUOTA) => { r.unwrap(); }
            _ = &mut watchdog => panic!(
                "window {window}: {} calls arrived in a minute, {} expected",
                fake.count(),
                window * QUOTA
            ),
        }
        if window < 4 {
            tokio::time::advance(WINDOW).await;
        }
    }
    for h in hs {
        if let Err(e) = h.await.unwrap() {
            panic!("{e}");
        }
    }
    stop.send(()).unwrap();
    assert!(watchdog.await.unwrap(), "the watchdog ran out");
    assert_eq!(rejected.load(Ordering::SeqCst), 0, "no 429 from the fake");
    assert_eq!(fake.count(), 40);
    // Ten calls at the start of each window, none in between.
    let mut per_window = std::collections::BTreeMap::new();
    for s in fake.requests() {
        *per_window
            .entry(s.at.duration_since(t0).as_millis())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_window.into_iter().collect::<Vec<_>>(),
        vec![(0, 10), (500, 10), (1000, 10), (1500, 10)]
    );
}

/// A fan-out held back by its provider's rate limit waits *outside* the pool: with two
/// workers, another run's step does not queue behind the rate-limited calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_the_rate_limit_hold_no_worker() {
    let fake = start(|_, _| Reply::completion("ok", 2)).await;
    let env = common::engine(
        &[
            ("OMNIFLOW_TIME_SCALE", "1"),
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "1/500ms"),
        ],
        2,
    );
    let sub = env.bus.subscribe();
    let limited = common::blueprint(json!({
        "name": "limited",
        "variables": { "TOPICS": ["a", "b", "c", "d", "e", "f"] },
        "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                     "prompt": "about {{ item }}", "forEach": "{{ vars.TOPICS }}", "cache": false } ]
    }));
    let quick = common::blueprint(json!({
        "name": "quick",
        "nodes": [ { "id": "t", "type": "transform", "template": "done" } ]
    }));
    let a = env.engine.start(limited, RunRequest::default()).unwrap();
    // Six places reserved at once: the later ones are told to wait (≥ 0.5 s away).
    let waiting = loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Some(Event::StepWaiting {
                run_id,
                provider,
                wait_ms,
                ..
            })) if run_id == a.run_id => break (provider, wait_ms),
            Ok(Some(_)) => continue,
            other => panic!("no StepWaiting event: {other:?}"),
        }
    };
    assert_eq!(waiting.0, "huggingface");
    assert!(waiting.1 >= 500, "{waiting:?}");
    let b = common::run(&env, &quick, RunRequest::default()).await;
    assert_eq!(b.status, RunStatus::Success);
    // Had the waiting calls held the two workers, `quick` would have queued behind at least
    // four of them (half a second apart each); here it had a second and a half to spare.
    let calls_before_quick_finished = fake.count();
    assert!(
        calls_before_quick_finished <= 3,
        "{calls_before_quick_finished} rate-limited calls went before a step of another run"
    );
    let a = a.wait().await;
    assert_eq!(a.status, RunStatus::Success, "{:?}", a.error);
    assert_eq!(fake.count(), 6);
}

/// The events of run `run_id` until it finishes (a run that never finishes fails the test
/// with the events seen so far).
async fn events_until_finished(sub: &omniflow::events::Subscriber, run_id: &str) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), sub.recv()).await {
            Ok(Some(e)) => {
                let finished = matches!(&e, Event::RunFinished { run_id: r, .. } if r == run_id);
                seen.push(e);
                if finished {
                    return seen;
                }
            }
            Ok(None) => continue,
            Err(_) => panic!("run {run_id} did not finish; events: {seen:#?}"),
        }
    }
}

/// The waits announced for run `run_id`: for the rate limit (in ms) and, as `None`, for a
/// place among the provider's calls in flight.
fn waits_of(events: &[Event], run_id: &str) -> Vec<Option<u64>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StepWaiting {
                run_id: r, wait_ms, ..
            } if r == run_id => Some(Some(*wait_ms)),
            Event::StepWaitingSlot { run_id: r, .. } if r == run_id => Some(None),
            _ => None,
        })
        .collect()
}

/// Waits for the rate limit that nobody would notice (under half a second) are not announced:
/// the console does not flash its steps as rate-limited for a blink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_wait_for_the_rate_limit_is_not_announced() {
    let fake = start(|_, _| Reply::completion("ok", 2)).await;
    let env = common::engine(
        &[
            ("OMNIFLOW_TIME_SCALE", "1"),
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            // Three calls at once: the second waits 100 ms, the third 200 ms.
            ("HF_RATE_LIMIT", "1/100ms"),
        ],
        4,
    );
    let sub = env.bus.subscribe();
    let bp = common::blueprint(json!({
        "name": "brief-waits",
        "variables": { "TOPICS": ["a", "b", "c"] },
        "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                     "prompt": "about {{ item }}", "forEach": "{{ vars.TOPICS }}", "cache": false } ]
    }));
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    let run_id = h.run_id.clone();
    let events = events_until_finished(&sub, &run_id).await;
    assert_eq!(h.wait().await.status, RunStatus::Success);
    assert_eq!(fake.count(), 3);
    assert_eq!(waits_of(&events, &run_id), vec![]);
}

/// A sandbox run's simulated model calls take no place in a real provider's rate limit or its
/// calls in flight: sandbox-testing a blueprint does not make the real runs after it wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_run_takes_no_place_in_a_real_providers_rate_limit() {
    let fake = start(|_, _| Reply::completion("ok", 2)).await;
    let env = common::engine(
        &[
            ("OMNIFLOW_TIME_SCALE", "1"),
            // Calls long enough to overlap: three at once, where the real provider takes one.
            ("SANDBOX_LATENCY_MS", "300"),
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "1/1h"),
            ("HF_CONCURRENCY", "1"),
        ],
        4,
    );
    let sub = env.bus.subscribe();
    let bp = common::blueprint(json!({
        "name": "fan",
        "variables": { "TOPICS": ["a", "b", "c"] },
        "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                     "prompt": "about {{ item }}", "forEach": "{{ vars.TOPICS }}", "cache": false } ]
    }));
    let h = env.engine.start(bp, common::sandbox(0.0, 7)).unwrap();
    let run_id = h.run_id.clone();
    let events = events_until_finished(&sub, &run_id).await;
    assert_eq!(h.wait().await.status, RunStatus::Success);
    assert_eq!(waits_of(&events, &run_id), vec![]);
    assert_eq!(fake.count(), 0, "the sandbox called the real provider");

    // The hour's one real call is still there for a real run.
    let one = common::blueprint(json!({
        "name": "one",
        "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                     "prompt": "hello", "cache": false } ]
    }));
    let h = env.engine.start(one, RunRequest::default()).unwrap();
    let run_id = h.run_id.clone();
    let events = events_until_finished(&sub, &run_id).await;
    assert_eq!(h.wait().await.status, RunStatus::Success);
    assert_eq!(waits_of(&events, &run_id), vec![]);
    assert_eq!(fake.count(), 1);
}

// ---- library call -----------------------------------------------------------------------

#[tokio::test]
async fn the_library_call_retries_a_loading_model_and_answers() {
    let fake = start(|_, i| {
        if i == 0 {
            Reply::json(
                503,
                json!({"error":"Model is currently loading","estimated_time":1.5}),
            )
        } else {
            Reply::sse(&["Answer."], Some(7), true)
        }
    })
    .await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &fake.url),
    ]);
    let r = library::call_with(&p, library::Request::new("Say something.")).await;
    assert!(r.success, "{r:?}");
    assert_eq!(r.output.as_deref(), Some("Answer."));
    assert_eq!(r.tokens_used, Some(7));
    assert_eq!(r.cached, Some(false));
    assert_eq!(r.model, "mistralai/Mistral-7B-Instruct-v0.2");
    assert_eq!(fake.count(), 2, "one retry after the 503");

    let bad = start(|_, _| Reply::json(401, json!({"error":"bad token"}))).await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &bad.url),
    ]);
    let r = library::call_with(&p, library::Request::new("x")).await;
    assert!(!r.success);
    assert!(r
        .error
        .unwrap()
        .starts_with("auth: Hugging Face refused the token"));
    assert_eq!(bad.count(), 1, "auth is not retried");

    // A model that stays loading: the first try and MAX_RETRIES more, then the reason.
    let loading = start(|_, _| {
        Reply::json(
            503,
            json!({"error":"Model is currently loading","estimated_time":1.5}),
        )
    })
    .await;
    let p = providers(&[
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", &loading.url),
        ("MAX_RETRIES", "2"),
    ]);
    let r = library::call_with(&p, library::Request::new("x")).await;
    assert!(!r.success);
    let error = r.error.unwrap();
    assert!(error.contains("loading"), "{error}");
    assert_eq!(loading.count(), 3, "one try and two retries");

    let v = serde_json::to_value(library::Response {
        success: true,
        tokens_used: Some(1),
        ..Default::default()
    })
    .unwrap();
    assert!(v.get("tokensUsed").is_some(), "the original's field names");
}

// ---- through the engine -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blueprint_run_against_the_hf_router_records_provider_and_tokens() {
    let fake = start(|s, _| {
        let prompt = s.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        Reply::sse(&["About ", &prompt], Some(30), true)
    })
    .await;
    let env = common::engine(
        &[
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "off"),
        ],
        8,
    );
    let sub = env.bus.subscribe();
    let bp = common::blueprint(json!({
        "name": "digest",
        "variables": { "TOPICS": ["rust", "wasm", "llm"] },
        "nodes": [
            { "id": "summarize", "type": "llm", "forEach": "{{ vars.TOPICS }}", "prompt": "{{ item }}" },
            { "id": "join", "type": "transform", "needs": ["summarize"], "template": "{{ nodes.summarize.output | join(' | ') }}" }
        ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(
        o.outputs["join"],
        json!("About rust | About wasm | About llm")
    );
    assert_eq!(o.tokens_used, 90);
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let s1 = steps.iter().find(|s| s.step_key == "summarize[1]").unwrap();
    assert_eq!(s1.provider.as_deref(), Some("huggingface"));
    assert_eq!(
        s1.model.as_deref(),
        Some("mistralai/Mistral-7B-Instruct-v0.2")
    );
    assert_eq!(s1.tokens_used, 30);
    let run = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(run.tokens_used, 90);
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    assert!(attempts
        .iter()
        .filter(|a| a.step_key.starts_with("summarize"))
        .all(|a| a.provider.as_deref() == Some("huggingface")));
    // Live token counts went to the bus.
    let mut live = 0;
    while let Some(ev) = sub.try_recv() {
        if let Event::Tokens { .. } = ev {
            live += 1;
        }
    }
    assert!(live >= 3, "token events: {live}");
    // The fallback note column exists and is empty (the only link answered).
    assert!(env.store.run_fallbacks(&o.run_id).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_stops_the_run_with_budget_exceeded() {
    let fake = start(|_, _| Reply::sse(&["words"], Some(50), true)).await;
    let env = common::engine(
        &[
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "off"),
        ],
        8,
    );
    let bp = common::blueprint(json!({
        "name": "budget",
        "maxTokensPerRun": 40,
        "nodes": [
            { "id": "a", "type": "llm", "prompt": "one" },
            { "id": "b", "type": "llm", "needs": ["a"], "prompt": "two" }
        ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(ErrorKind::BudgetExceeded));
    assert_eq!(o.failed_step.as_deref(), Some("b"));
    assert!(o.error.unwrap().contains("maxTokensPerRun"));
    assert_eq!(fake.count(), 1, "the second call was never made");
    let run = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(run.error_kind.map(|k| k.as_str()), Some("budget_exceeded"));
    assert_eq!(run.tokens_used, 50);

    // The global default applies when the blueprint sets none.
    let env = common::engine(
        &[
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("MAX_TOKENS_PER_RUN", "10"),
        ],
        8,
    );
    let bp = common::blueprint(json!({
        "name": "budget2",
        "nodes": [
            { "id": "a", "type": "llm", "prompt": "one" },
            { "id": "b", "type": "llm", "needs": ["a"], "prompt": "two", "cache": false }
        ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.error_kind, Some(ErrorKind::BudgetExceeded));
}

/// A 40-way fan-out under a budget of ten calls' worth: calls in flight count against the
/// budget by their estimates, so the run stops near the budget instead of spending 40 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_does_not_overshoot_its_budget_by_the_calls_in_flight() {
    let fake = start(|_, _| Reply::completion("a short answer", 100)).await;
    let env = common::engine(
        &[
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "off"),
        ],
        64,
    );
    let topics: Vec<String> = (0..40).map(|i| format!("topic {i}")).collect();
    let bp = common::blueprint(json!({
        "name": "budget-fan",
        "maxTokensPerRun": 1000,
        "variables": { "TOPICS": topics },
        "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                     "prompt": "Two sentences on {{ item }}.", "forEach": "{{ vars.TOPICS }}",
                     "cache": false } ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(ErrorKind::BudgetExceeded));
    let run = env.store.find_run(&o.run_id).unwrap();
    // Each call spends 100: the budget holds ten. Estimates may let one more start.
    assert!(
        (10..=11).contains(&fake.count()),
        "{} calls for a budget of 10",
        fake.count()
    );
    assert!(run.tokens_used <= 1100, "{} tokens spent", run.tokens_used);
}

/// Two model calls of one fan-out, with `maxTokens` when given, under a budget of 1,000
/// tokens, each prompt `context` then a few words (about 7 tokens), each answered by `fake`
/// with 20 tokens. Returns how many were in flight together at the most.
async fn two_calls_under_a_budget(
    fake: &common::counting::CountingFake,
    context: &str,
    max_tokens: Option<u32>,
) -> usize {
    let env = common::engine(
        &[
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "off"),
            // Unscaled: the attempt timeout must not end a call the fake holds.
            ("OMNIFLOW_TIME_SCALE", "1"),
        ],
        4,
    );
    let mut bp = json!({
        "name": "two-under-a-budget",
        "maxTokensPerRun": 1000,
        "variables": { "TOPICS": ["topic 1", "topic 2"], "CONTEXT": context },
        "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                     "prompt": "{{ vars.CONTEXT }}Two sentences on {{ item }}.",
                     "forEach": "{{ vars.TOPICS }}", "cache": false } ]
    });
    if let Some(n) = max_tokens {
        bp["nodes"][0]["maxTokens"] = json!(n);
    }
    let bp = common::blueprint(bp);
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.tokens_used, 40);
    assert_eq!(env.store.run_attempts(&o.run_id).unwrap().len(), 2);
    fake.peak.load(Ordering::SeqCst)
}

fn twenty_tokens() -> String {
    json!({"model":"m","choices":[{"message":{"content":"ok"},"finish_reason":"stop"}],
           "usage":{"total_tokens":20}})
    .to_string()
}

/// A call with `maxTokens` is estimated at its prompt plus that many tokens of answer: two
/// short prompts' calls (17 tokens each) fit the budget side by side, so both are in flight
/// together (the fake answers neither until both have arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_fit_the_budget_by_their_max_tokens_run_side_by_side() {
    let fake = common::counting::start_gathering(2, twenty_tokens());
    assert_eq!(
        two_calls_under_a_budget(&fake, "", Some(10)).await,
        2,
        "both calls were in flight together"
    );
}

/// A run's first calls without `maxTokens` are estimated at their prompt plus 256 tokens of
/// answer (there is no average yet): two short prompts' calls (about 263 each) fit a budget of
/// 1,000 side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_calls_without_max_tokens_fit_the_budget_by_a_guess_of_256_tokens() {
    let fake = common::counting::start_gathering(2, twenty_tokens());
    assert_eq!(
        two_calls_under_a_budget(&fake, "", None).await,
        2,
        "both calls were in flight together"
    );
}

/// A call's prompt counts in its estimate before it is sent: two calls of about 600 prompt
/// tokens each do not fit the budget side by side, so the second waits for the first to end
/// (then only the 20 tokens it really spent count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_counts_against_the_budget_before_its_call() {
    let fake = common::counting::start(Duration::from_millis(300), twenty_tokens());
    assert_eq!(
        two_calls_under_a_budget(&fake, &"x".repeat(2400), Some(10)).await,
        1,
        "the second call waited for the first"
    );
}

/// A call without `maxTokens` is estimated at the run's average call so far (and at least
/// its prompt): after a first call of 20 tokens, two more fit a budget of 300 side by side,
/// where a guess of 256 tokens of answer each would let only one run at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_estimated_by_the_runs_average_so_far_run_side_by_side() {
    // The first call is answered at once; the next two only once both have arrived.
    let first = common::counting::start(Duration::ZERO, twenty_tokens());
    let fake = common::counting::start_gathering(2, twenty_tokens());
    let openai = format!("{}/v1", first.url);
    let env = common::engine(
        &[
            ("OPENAI_BASE_URL", openai.as_str()),
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
            ("HF_RATE_LIMIT", "off"),
            // Unscaled: the attempt timeout must not end a call the fake holds.
            ("OMNIFLOW_TIME_SCALE", "1"),
        ],
        4,
    );
    let bp = common::blueprint(json!({
        "name": "average-side-by-side",
        "maxTokensPerRun": 300,
        "variables": { "TOPICS": ["topic 1", "topic 2"] },
        "nodes": [
            { "id": "first", "type": "llm", "provider": "openai", "model": "m",
              "prompt": "One sentence.", "cache": false },
            { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
              "needs": ["first"], "prompt": "Two sentences on {{ item }}.",
              "forEach": "{{ vars.TOPICS }}", "cache": false }
        ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.tokens_used, 60);
    assert_eq!(
        fake.peak.load(Ordering::SeqCst),
        2,
        "both calls were in flight together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_run_replays_the_recorded_answers_of_a_run() {
    let env = common::engine(&[("SANDBOX_LATENCY_MS", "0")], 8);
    let bp = common::blueprint(json!({
        "name": "rec",
        "variables": { "T": ["a", "b"] },
        "nodes": [
            { "id": "ask", "type": "llm", "model": "rec-model", "forEach": "{{ vars.T }}",
              "prompt": "About {{ item }}" },
            { "id": "extra", "type": "llm", "prompt": "Something else" }
        ]
    }));
    let first = common::run(&env, &bp, common::sandbox(0.0, 1)).await;
    assert_eq!(first.status, RunStatus::Success);
    // Pretend the recorded answers came from a real model.
    let mut replay = HashMap::new();
    replay.insert("ask[0]".to_string(), json!("recorded answer A"));
    replay.insert("ask[1]".to_string(), json!("recorded answer B"));
    let req = RunRequest {
        replay,
        ..common::sandbox(0.0, 2)
    };
    let o = common::run(&env, &bp, req).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(
        o.outputs["ask"],
        json!(["recorded answer A", "recorded answer B"])
    );
    assert_eq!(
        o.outputs["extra"], first.outputs["extra"],
        "unknown steps: the simulated model"
    );
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let a0 = steps.iter().find(|s| s.step_key == "ask[0]").unwrap();
    assert_eq!(a0.provider.as_deref(), Some("replay"));
    assert_eq!(
        a0.model.as_deref(),
        Some("rec-model"),
        "the model it stands in for"
    );
    assert!(a0.cached);
}

// ---- the real binary: doctor, doctor --pull, run --replay ----------------------------------

async fn omniflow(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omniflow"));
    cmd.env_clear()
        .current_dir(dir)
        .env("DB_FILE", dir.join("h.db"))
        .env("LOG_DIR", dir.join("logs"))
        .env("OMNIFLOW_TIME_SCALE", "0.001")
        .args(args);
    // A coverage run (cargo llvm-cov) counts the binary's lines only if told where to.
    if let Some(v) = std::env::var_os("LLVM_PROFILE_FILE") {
        cmd.env("LLVM_PROFILE_FILE", v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// `omniflow run` says once per node that its calls wait for the provider's rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omniflow_run_says_when_calls_wait_for_the_rate_limit() {
    let fake = start(|_, _| Reply::completion("ok", 2)).await;
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("limited.json");
    std::fs::write(
        &bp,
        json!({
            "name": "limited",
            "variables": { "TOPICS": ["a", "b", "c", "d"] },
            "nodes": [ { "id": "ask", "type": "llm", "provider": "huggingface", "model": "m",
                         "prompt": "about {{ item }}", "forEach": "{{ vars.TOPICS }}" } ]
        })
        .to_string(),
    )
    .unwrap();
    let env = [
        ("OMNIFLOW_TIME_SCALE", "1"),
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", fake.url.as_str()),
        ("HF_RATE_LIMIT", "1/600ms"),
    ];
    let out = omniflow(dir.path(), &["run", bp.to_str().unwrap()], &env).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let said = err
        .lines()
        .filter(|l| l.contains("⧗ ask: waiting") && l.contains("huggingface's rate limit"))
        .count();
    assert_eq!(said, 1, "once for the node:\n{err}");
    assert_eq!(fake.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_each_configured_provider_live() {
    let dir = tempfile::tempdir().unwrap();
    let ollama = start(|s, _| match s.path.as_str() {
        "/api/tags" => Reply::json(200, json!({"models":[{"name":"mistral:latest","size":1}]})),
        _ => Reply::json(404, json!({"error":"not found"})),
    })
    .await;
    let hf_ok = start(|s, _| {
        if s.header("authorization") == Some("Bearer hf_testtoken123") {
            Reply::json(200, json!({"object":"list","data":[{"id":"a"},{"id":"b"}]}))
        } else {
            Reply::json(401, json!({"error":"Invalid credentials"}))
        }
    })
    .await;
    let env = [
        ("USE_OLLAMA", "true"),
        ("OLLAMA_URL", ollama.url.as_str()),
        ("HF_TOKEN", "hf_testtoken123"),
        ("HF_INFERENCE_URL", hf_ok.url.as_str()),
    ];
    let out = omniflow(dir.path(), &["doctor"], &env).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("provider chain (auto): ollama → huggingface"),
        "{text}"
    );
    assert!(text.contains("mistral:latest"), "{text}");
    assert!(text.contains("2 chat model(s)"), "{text}");
    assert!(text.contains("HUGGINGFACE_TOKEN    set"), "{text}");
    // A fresh directory: doctor reports the database without creating it.
    assert!(
        text.contains("does not exist yet: the first run creates it"),
        "{text}"
    );
    assert!(
        !dir.path().join("h.db").exists(),
        "doctor created the database"
    );
    assert!(
        !text.contains("hf_testtoken123"),
        "secrets only as set/unset"
    );
    // `mistral:latest` is the default `mistral`; a default the server lacks is named with
    // the command that pulls it.
    assert!(!text.contains("is missing"), "{text}");
    let lacking = [
        ("USE_OLLAMA", "true"),
        ("OLLAMA_URL", ollama.url.as_str()),
        ("OLLAMA_MODEL", "llama3"),
    ];
    let out = omniflow(dir.path(), &["doctor"], &lacking).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the default llama3 is missing: omniflow doctor --pull llama3"),
        "{text}"
    );

    let env = [
        ("USE_OLLAMA", "true"),
        ("OLLAMA_URL", ollama.url.as_str()),
        ("HF_TOKEN", "hf_wrongtoken99"),
        ("HF_INFERENCE_URL", hf_ok.url.as_str()),
    ];
    let out = omniflow(dir.path(), &["doctor", "--json"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], json!(false));
    assert_eq!(v["providers"][0]["ok"], json!(true));
    assert_eq!(v["providers"][1]["ok"], json!(false));
    assert!(v["providers"][1]["detail"]
        .as_str()
        .unwrap()
        .starts_with("auth:"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hf_wrongtoken99"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_pull_streams_the_progress() {
    let dir = tempfile::tempdir().unwrap();
    let ollama = start(|_, _| Reply::Stream {
        content_type: "application/x-ndjson".into(),
        pieces: vec![
            "{\"status\":\"pulling manifest\"}\n".into(),
            "{\"status\":\"downloading sha256:abc\",\"digest\":\"sha256:abc\",\"total\":2000,\"completed\":1000}\n".into(),
            "{\"status\":\"verifying sha256 digest\"}\n".into(),
            "{\"status\":\"success\"}\n".into(),
        ],
    })
    .await;
    let out = omniflow(
        dir.path(),
        &["doctor", "--pull", "mistral"],
        &[("OLLAMA_URL", ollama.url.as_str())],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("pulling manifest") && err.contains("50%"),
        "{err}"
    );
    assert!(err.contains("pulled mistral"), "{err}");
    assert_eq!(ollama.requests()[0].json()["model"], json!("mistral"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_replay_answers_with_a_recorded_run() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("rec.json");
    std::fs::write(
        &bp,
        json!({
            "name": "rec",
            "nodes": [ { "id": "ask", "type": "llm", "prompt": "Two sentences on rust." } ]
        })
        .to_string(),
    )
    .unwrap();
    let env = [("SANDBOX_LATENCY_MS", "0")];
    let bp_arg = bp.display().to_string();
    let out = omniflow(dir.path(), &["run", &bp_arg, "--sandbox", "--json"], &env).await;
    assert_eq!(out.status.code(), Some(0));
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = first["runId"].as_str().unwrap().to_string();
    // Make the recording distinguishable from the simulated model.
    let conn = rusqlite::Connection::open(dir.path().join("h.db")).unwrap();
    conn.execute(
        "UPDATE runner_steps SET output = '\"the recorded answer\"' WHERE run_id = ?1 AND step_key = 'ask'",
        [&id],
    )
    .unwrap();
    drop(conn);
    let out = omniflow(
        dir.path(),
        &["run", &bp_arg, "--sandbox", "--replay", &id, "--json"],
        &env,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"]["ask"], json!("the recorded answer"));
    assert_eq!(v["steps"][0]["cached"], json!(true));
    // Replay needs a sandbox run.
    let out = omniflow(dir.path(), &["run", &bp_arg, "--replay", &id], &env).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sandbox"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_records_which_provider_answered_and_why_others_were_skipped() {
    let fake = start(|_, _| Reply::sse(&["answer"], Some(8), true)).await;
    let down = refused_url().await;
    let env = common::engine(
        &[
            ("USE_OLLAMA", "true"),
            ("OLLAMA_URL", &down),
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
        ],
        8,
    );
    let bp = common::blueprint(json!({
        "name": "fb",
        "nodes": [ { "id": "ask", "type": "llm", "prompt": "hi" } ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps[0].provider.as_deref(), Some("huggingface"));
    let fb = env.store.run_fallbacks(&o.run_id).unwrap();
    assert_eq!(fb.len(), 1);
    assert_eq!((fb[0].0.as_str(), fb[0].1), ("ask", 1));
    assert!(fb[0].2.contains("ollama skipped (network"), "{}", fb[0].2);
    assert!(!fb[0].2.contains("hf_testtoken123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_attempt_timeout_stops_a_call_to_a_silent_server() {
    let fake = start(|_, _| Reply::Hang).await;
    let env = common::engine(
        &[
            ("HF_TOKEN", "hf_testtoken123"),
            ("HF_INFERENCE_URL", &fake.url),
        ],
        8,
    );
    // 200 s scaled by 0.001 = 200 ms.
    let bp = common::blueprint(json!({
        "name": "silent",
        "nodes": [ { "id": "ask", "type": "llm", "prompt": "hi", "timeout": "200s", "retry": { "attempts": 2 } } ]
    }));
    let o = common::run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(ErrorKind::Timeout));
    assert!(o.error.unwrap().contains("timed out"));
    assert_eq!(fake.count(), 2, "retried once");
    // Up to 10 s: a loaded machine can be slow to notice the closed socket.
    for _ in 0..1000 {
        if fake.dropped_by_client.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        fake.dropped_by_client.load(Ordering::SeqCst),
        2,
        "each timed-out attempt closed its connection"
    );
}

// ---- a pooled connection the server closed --------------------------------------------------

/// A server that keeps the first connection open after its first reply (it says keep-alive)
/// but closes it, unanswered, when the second request comes on it — what llama-server does
/// after a streamed reply, caught at the worst moment. Every later connection is answered.
/// Returns the URL and the count of requests answered and dropped.
async fn closes_the_pooled_connection() -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answered = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let (a, d) = (answered.clone(), dropped.clone());
    tokio::spawn(async move {
        let body = json!({"model":"served","choices":[{"message":{"content":"fine"},
                          "finish_reason":"stop"}],"usage":{"total_tokens":3}})
        .to_string();
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Keep-Alive: timeout=5, max=100\r\n\r\n{body}",
            body.len()
        );
        let mut first = true;
        while let Ok((mut sock, _)) = listener.accept().await {
            let (a, d, reply) = (a.clone(), d.clone(), reply.clone());
            let closes = std::mem::replace(&mut first, false);
            tokio::spawn(async move {
                let mut n = 0;
                while common::http::read_request(&mut sock).await.is_some() {
                    n += 1;
                    if closes && n == 2 {
                        d.fetch_add(1, Ordering::SeqCst);
                        return; // dropped: closed without a byte of reply
                    }
                    a.fetch_add(1, Ordering::SeqCst);
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, answered, dropped)
}

/// The second call goes out on the pooled connection, which the server closes unanswered:
/// it is sent again at once on a new connection and succeeds, with no error to retry.
#[tokio::test]
async fn a_pooled_connection_closed_before_the_reply_is_replaced_at_once() {
    let (url, answered, dropped) = closes_the_pooled_connection().await;
    let p = providers(&[
        ("OPENAI_BASE_URL", url.as_str()),
        ("OPENAI_CONCURRENCY", "off"),
    ]);
    let r = req("openai", "asked");
    let first = call(&p, &r).await.unwrap();
    assert_eq!(first.text, "fine");
    assert_eq!(first.reply_model.as_deref(), Some("served"));
    assert_eq!(first.finish_reason.as_deref(), Some("stop"));
    let second = call(&p, &r).await.unwrap();
    assert_eq!(second.text, "fine");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the pooled connection was not reused"
    );
    assert_eq!(answered.load(Ordering::SeqCst), 2);
}

// ---- calls in flight per provider -----------------------------------------------------------

/// An OpenAI-compatible fake that answers `/props` with `total_slots` (when given) and every
/// chat call after 150 ms, counting the calls it holds at once. Returns the URL and the most
/// calls it held.
async fn slotted_server(total_slots: Option<u64>) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let most = Arc::new(AtomicU64::new(0));
    let now = Arc::new(AtomicU64::new(0));
    let m = most.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (most, now) = (m.clone(), now.clone());
            tokio::spawn(async move {
                let Some(r) = common::http::read_request(&mut sock).await else {
                    return;
                };
                let json_header = [("Content-Type".to_string(), "application/json".to_string())];
                if r.target.ends_with("/props") {
                    let body = match total_slots {
                        Some(n) => json!({ "total_slots": n }),
                        None => json!({}),
                    };
                    common::http::write_reply(&mut sock, 200, &json_header, &body.to_string())
                        .await;
                    return;
                }
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(held, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                let body = json!({"model":"m","choices":[{"message":{"content":"ok"},
                                  "finish_reason":"stop"}],"usage":{"total_tokens":2}});
                common::http::write_reply(&mut sock, 200, &json_header, &body.to_string()).await;
            });
        }
    });
    (url, most)
}

/// A fan-out of 8 on a pool of 8: the provider's cap (`OPENAI_CONCURRENCY`, else the server's
/// `/props` slot count) keeps the calls in flight at the cap; the others wait outside the pool
/// and say so (`StepWaitingSlot`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_stay_within_the_providers_cap() {
    for (configured, props, cap) in [(Some("2"), None, 2), (None, Some(3), 3)] {
        let (url, most) = slotted_server(props).await;
        let mut vars = vec![("OPENAI_BASE_URL", url.as_str())];
        vars.extend(configured.map(|n| ("OPENAI_CONCURRENCY", n)));
        let env = common::engine(&vars, 8);
        let sub = env.bus.subscribe();
        let bp = common::blueprint(json!({
            "name": "capped",
            "variables": { "TOPICS": ["a", "b", "c", "d", "e", "f", "g", "h"] },
            "nodes": [ { "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                         "prompt": "about {{ item }}", "forEach": "{{ vars.TOPICS }}",
                         "cache": false } ]
        }));
        let o = common::run(&env, &bp, RunRequest::default()).await;
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        assert_eq!(most.load(Ordering::SeqCst), cap, "cap {cap}");
        let mut told = None;
        while let Some(ev) = sub.try_recv() {
            if let Event::StepWaitingSlot {
                provider, limit, ..
            } = ev
            {
                told = Some((provider, limit));
            }
        }
        assert_eq!(told, Some(("openai".to_string(), cap as usize)));
    }
}

/// llama-server reports a failure that comes after its 200 head inside the stream (an error
/// object instead of a chunk): the call fails as a server error with the server's words,
/// not as a success with half an answer. (The real server cannot be made to do this on
/// purpose, so the fake sends what it sends.)
#[tokio::test]
async fn an_error_inside_a_200_stream_fails_the_call_with_its_message() {
    let fake = start(|s, _| {
        if s.path.ends_with("/props") {
            return Reply::json(404, json!({"error":"not found"}));
        }
        let mut r = Reply::sse(&["half an"], None, false);
        if let Reply::Stream { pieces, .. } = &mut r {
            pieces.push(format!(
                "data: {}\n\n",
                json!({"error":{"code":500,"message":"Context size has been exceeded.","type":"server_error"}})
            ));
            pieces.push("data: [DONE]\n\n".into());
        }
        r
    })
    .await;
    let base = format!("{}/v1", fake.url);
    let p = providers(&[("OPENAI_BASE_URL", &base)]);
    let e = call(&p, &req("openai", "local")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Server, "{e}");
    assert!(e.message.contains("Context size has been exceeded."), "{e}");
}
