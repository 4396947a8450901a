//! What each node type does. `prepare` renders a step's templates once (pure, before any
//! attempt); `execute` is one attempt (the part that may fail and be retried).

use super::run::RunCtx;
use crate::blueprint::{Channel, DurationSpec, Node, NodeKind, Parse};
use crate::error::{ErrorKind, StepError};
use crate::providers::{Admission, AttemptKey, CallOptions, LlmRequest, DEFAULT_MODEL};
use crate::template::{Context, Templates};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Replies larger than this are refused rather than held in memory.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// A step with its templates rendered. Serialisable: a fleet worker on another host runs it
/// from its queue row.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Prepared {
    Llm {
        req: LlmRequest,
        parse: Parse,
        /// Use the response cache (a node's `"cache": false` turns it off).
        cache: bool,
        /// A cut-off answer (`finish_reason: length`) fails the step.
        fail_on_truncation: bool,
    },
    Http {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Option<Value>,
        response: String,
    },
    /// transform and condition: computed while preparing.
    Value(Value),
    Notify {
        channel: Channel,
        text: String,
        parse_mode: Option<String>,
    },
    Delay(Duration),
}

/// What a successful attempt produced.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct StepOutput {
    pub value: Value,
    pub tokens: u64,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub cached: bool,
    /// Providers an `auto` chain skipped before one answered, and why.
    pub fallback: Option<String>,
    /// The model the server says answered.
    pub reply_model: Option<String>,
    /// Why the model stopped (`length`: cut off).
    pub finish_reason: Option<String>,
}

impl Prepared {
    /// The step's input as recorded in history (header values that look like credentials are
    /// masked).
    pub fn input_record(&self) -> Option<Value> {
        match self {
            Prepared::Llm { req, .. } => Some(json!({
                "provider": req.provider,
                "model": req.model,
                "system": req.system,
                "prompt": req.prompt,
                "temperature": req.temperature,
                "maxTokens": req.max_tokens,
            })),
            Prepared::Http {
                method,
                url,
                headers,
                body,
                ..
            } => {
                let headers: Map<String, Value> = headers
                    .iter()
                    .map(|(k, v)| {
                        let secret = ["authorization", "cookie", "x-api-key", "api-key", "apikey"]
                            .contains(&k.to_ascii_lowercase().as_str());
                        let v = if secret {
                            "[REDACTED]".to_string()
                        } else {
                            v.clone()
                        };
                        (k.clone(), Value::String(v))
                    })
                    .collect();
                Some(json!({ "method": method, "url": url, "headers": headers, "body": body }))
            }
            Prepared::Value(_) => None,
            Prepared::Notify {
                channel,
                text,
                parse_mode,
            } => {
                Some(json!({ "channel": channel.as_str(), "text": text, "parseMode": parse_mode }))
            }
            Prepared::Delay(d) => Some(json!({ "durationMs": d.as_millis() as u64 })),
        }
    }
}

/// Renders the node's templates against `context`.
pub(crate) fn prepare(ctx: &RunCtx, node: &Node, context: &Context) -> Result<Prepared, StepError> {
    let t = ctx.templates();
    let named = |what: &str, e: StepError| StepError {
        message: format!("{}.{what}: {}", node.id, e.message),
        ..e
    };
    if ctx.is_sandbox {
        if let Some(out) = &node.sandbox_output {
            return Ok(Prepared::Value(out.clone()));
        }
    }
    Ok(match &node.kind {
        NodeKind::Llm(l) => {
            let defaults = &ctx.blueprint.defaults;
            Prepared::Llm {
                req: LlmRequest {
                    provider: l
                        .provider
                        .clone()
                        .or_else(|| defaults.provider.clone())
                        .unwrap_or_else(|| "auto".into()),
                    model: l
                        .model
                        .clone()
                        .or_else(|| defaults.model.clone())
                        .unwrap_or_else(|| DEFAULT_MODEL.into()),
                    system: match &l.system {
                        Some(s) => Some(t.render_in(s, context).map_err(|e| named("system", e))?),
                        None => None,
                    },
                    prompt: t
                        .render_in(&l.prompt, context)
                        .map_err(|e| named("prompt", e))?,
                    temperature: l.temperature,
                    max_tokens: l.max_tokens,
                    subject: match context.item() {
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Null) | None => None,
                        Some(other) => Some(other.to_string()),
                    },
                },
                parse: l.parse,
                cache: l.cache.unwrap_or(true),
                fail_on_truncation: l.fail_on_truncation.unwrap_or(false),
            }
        }
        NodeKind::Http(h) => {
            let mut headers = Vec::new();
            for (k, v) in &h.headers {
                let v = match v {
                    Value::String(s) => t.render_in(s, context).map_err(|e| named("headers", e))?,
                    other => other.to_string(),
                };
                headers.push((k.clone(), v));
            }
            Prepared::Http {
                method: h.method.to_ascii_uppercase(),
                url: t.render_in(&h.url, context).map_err(|e| named("url", e))?,
                headers,
                body: match &h.body {
                    Some(b) => Some(render_value(t, b, context).map_err(|e| named("body", e))?),
                    None => None,
                },
                response: h.response.clone().unwrap_or_else(|| "auto".into()),
            }
        }
        NodeKind::Transform(tr) => {
            #[cfg(test)]
            super::panics::injected(&tr.template, "prepare");
            let text = t
                .render_in(&tr.template, context)
                .map_err(|e| named("template", e))?;
            Prepared::Value(match tr.parse {
                Parse::Text => Value::String(text),
                Parse::Json => serde_json::from_str(text.trim()).map_err(|e| {
                    StepError::new(
                        ErrorKind::Template,
                        format!(
                            "{}.template: the rendered text is not valid JSON ({e}); use `tojson` for values, or parse: \"text\"",
                            node.id
                        ),
                    )
                })?,
            })
        }
        NodeKind::Condition(c) => {
            let v = t
                .eval_expr_in(&c.expression, context)
                .map_err(|e| named("expression", e))?;
            Prepared::Value(Value::Bool(Templates::is_truthy(&v)))
        }
        NodeKind::Notify(n) => {
            let text = t
                .render_in(&n.text, context)
                .map_err(|e| named("text", e))?;
            // Split into 4,096-character messages, a long text would flood the chat.
            if text.len() > crate::limits::MAX_NOTIFICATION_BYTES {
                return Err(named(
                    "text",
                    StepError::new(
                        ErrorKind::InvalidRequest,
                        format!(
                            "the notification text is {} bytes, more than {}; shorten it (e.g. \
                             with the truncate filter) or send a summary",
                            text.len(),
                            crate::limits::human_bytes(crate::limits::MAX_NOTIFICATION_BYTES)
                        ),
                    ),
                ));
            }
            Prepared::Notify {
                channel: n.channel,
                text,
                parse_mode: n.parse_mode.clone(),
            }
        }
        NodeKind::Delay(d) => Prepared::Delay(d.duration.get()),
    })
}

/// Renders every string inside a JSON value as a template.
fn render_value(t: &Templates, v: &Value, context: &Context) -> Result<Value, StepError> {
    Ok(match v {
        Value::String(s) => Value::String(t.render_in(s, context)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_value(t, x, context))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => {
            let mut m = Map::new();
            for (k, x) in o {
                m.insert(k.clone(), render_value(t, x, context)?);
            }
            Value::Object(m)
        }
        other => other.clone(),
    })
}

/// The per-attempt timeout: the node's, else the blueprint default's, else `REQUEST_TIMEOUT`.
/// A delay node always gets its own duration on top.
pub(crate) fn attempt_timeout(ctx: &RunCtx, node: &Node, prepared: &Prepared) -> Duration {
    let base = node
        .timeout
        .as_ref()
        .or(ctx.blueprint.defaults.timeout.as_ref())
        .map(DurationSpec::get)
        .unwrap_or(ctx.inner.config.request_timeout);
    match prepared {
        // A delay's own `timeout` bounds the whole step, as on every other node; without
        // one, the wait comes on top of the default.
        Prepared::Delay(_) if node.timeout.is_some() => base,
        Prepared::Delay(d) => base.saturating_add(*d),
        _ => base,
    }
}

/// The error of a model call the run's token budget no longer allows.
pub(crate) fn budget_spent(spent: u64, budget: u64) -> StepError {
    StepError::new(
        ErrorKind::BudgetExceeded,
        format!(
            "the run's token budget is spent ({spent} of {budget} tokens); raise the blueprint's \
             \"maxTokensPerRun\" (or MAX_TOKENS_PER_RUN), or use a smaller model or maxTokens"
        ),
    )
}

/// What one attempt needs besides its prepared input: the process's engine parts (its
/// providers, its HTTP client, its store) and the few facts of the run an attempt reads. A
/// run's driver makes it from its [`RunCtx`]; a fleet worker makes it from a queue row, with
/// its own host's engine (so a claimed model call goes to that host's providers).
pub(crate) struct AttemptEnv<'a> {
    pub inner: &'a super::Inner,
    pub run_id: &'a str,
    pub parent_run_id: Option<&'a str>,
    pub sandbox: Option<&'a crate::providers::SimulatedModel>,
    pub is_sandbox: bool,
    pub replay: Option<&'a std::collections::HashMap<String, Value>>,
    /// The run's token budget and what it spent so far (the driver's last check; a fleet
    /// worker has neither, its driver checked before enqueueing).
    pub budget: Option<(u64, &'a std::sync::atomic::AtomicU64)>,
}

impl RunCtx {
    /// The attempt environment of this run's steps, in this process.
    pub(crate) fn env(&self) -> AttemptEnv<'_> {
        AttemptEnv {
            inner: &self.inner,
            run_id: &self.run_id,
            parent_run_id: self.parent_run_id.as_deref(),
            sandbox: self.sandbox.as_ref(),
            is_sandbox: self.is_sandbox,
            replay: Some(&self.replay),
            budget: self.token_budget.map(|b| (b, &self.tokens_spent)),
        }
    }
}

/// One attempt of a prepared step.
pub(crate) async fn execute(
    ctx: &AttemptEnv<'_>,
    prepared: &Prepared,
    step: &str,
    attempt: u32,
    admission: Option<Admission>,
) -> Result<StepOutput, StepError> {
    #[cfg(test)]
    if let Prepared::Value(v) = prepared {
        super::panics::injected(v.as_str().unwrap_or_default(), "attempt");
    }
    match prepared {
        Prepared::Value(v) => Ok(StepOutput {
            value: v.clone(),
            ..Default::default()
        }),
        Prepared::Delay(d) => {
            // Holds no place in a shutdown's wait (see `step::run_attempt`).
            tokio::time::sleep(ctx.inner.config.scaled(*d)).await;
            Ok(StepOutput {
                value: json!({ "waitedMs": d.as_millis() as u64 }),
                ..Default::default()
            })
        }
        Prepared::Llm {
            req,
            parse,
            cache,
            fail_on_truncation,
        } => {
            // Token budget: the step already waited for room in the budget
            // (`step::hold_budget`, counting the calls in flight); this is the last check
            // against the tokens the run's finished attempts spent.
            if let Some((budget, spent)) = ctx.budget {
                let spent = spent.load(std::sync::atomic::Ordering::Relaxed);
                if spent >= budget {
                    return Err(budget_spent(spent, budget));
                }
            }
            // Record and replay: a recorded answer stands in for the model.
            if let Some(recorded) = ctx.replay.and_then(|r| r.get(step)) {
                let text = match recorded {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let value = match parse {
                    Parse::Text => Value::String(text.trim().to_string()),
                    Parse::Json => parse_model_json(&text)?,
                };
                return Ok(StepOutput {
                    value,
                    provider: Some("replay".into()),
                    model: Some(req.model.clone()),
                    cached: true,
                    ..Default::default()
                });
            }
            // Streamed token counts go to the bus as progress events (dropped, never waited
            // for, when a subscriber is slow).
            let publish = |tokens: u64| {
                ctx.inner.bus.publish(crate::events::Event::Tokens {
                    run_id: ctx.run_id.to_string(),
                    step: step.to_string(),
                    tokens,
                })
            };
            let mut opts = CallOptions::new(AttemptKey { step, attempt });
            opts.sandbox = ctx.sandbox;
            opts.progress = Some(&publish);
            opts.cache = *cache;
            opts.json = matches!(parse, Parse::Json);
            // A retry goes to the model: the cached answer may be what failed.
            opts.refresh = attempt > 1;
            let reply = ctx
                .inner
                .providers
                .complete_admitted(req, opts, admission)
                .await?;
            if reply.text.trim().is_empty() {
                return Err(StepError::new(
                    ErrorKind::EmptyOutput,
                    format!("the model {} returned an empty answer", reply.model),
                ));
            }
            if reply.truncated() {
                if *fail_on_truncation {
                    return Err(truncated(req.max_tokens, &reply.text));
                }
                tracing::warn!(run_id = %ctx.run_id, step, model = %reply.model, "the answer was cut off (finish_reason: length); raise maxTokens or the server's context size");
            }
            let value = match parse {
                Parse::Text => Value::String(reply.text.trim().to_string()),
                Parse::Json => parse_model_json(&reply.text)?,
            };
            Ok(StepOutput {
                value,
                tokens: reply.tokens_used.unwrap_or(0),
                provider: Some(reply.provider),
                model: Some(reply.model),
                cached: reply.cached,
                fallback: reply.fallback,
                reply_model: reply.reply_model,
                finish_reason: reply.finish_reason,
            })
        }
        Prepared::Http {
            method,
            url,
            headers,
            body,
            response,
        } => {
            if ctx.is_sandbox {
                return Ok(StepOutput {
                    value: simulated_reply(url, response),
                    provider: Some(crate::blueprint::ProviderName::Sandbox.as_str().into()),
                    ..Default::default()
                });
            }
            http_call(ctx, method, url, headers, body.as_ref(), response).await
        }
        Prepared::Notify {
            channel,
            text,
            parse_mode,
        } => {
            if ctx.is_sandbox {
                tracing::info!(run_id = %ctx.run_id, step, channel = channel.as_str(), "sandbox: notification recorded, not sent");
                return Ok(StepOutput {
                    value: crate::notify::sandbox_record(*channel, text, parse_mode.as_deref()),
                    provider: Some(channel.as_str().into()),
                    ..Default::default()
                });
            }
            // The step is durably `running` before anything is sent, so a resume after a
            // crash knows the message may have left and does not send it twice. On a full
            // disk this waits for room: no message goes out whose record cannot be saved.
            ctx.inner.store.flush_durable().await;
            // Delivered parts are recorded under the retry chain's root, so neither a retried
            // attempt nor a retried run sends a part twice (see notify/mod.rs).
            let store = ctx.inner.store.clone();
            let start = ctx
                .parent_run_id
                .map(str::to_string)
                .unwrap_or_else(|| ctx.run_id.to_string());
            let root = tokio::task::spawn_blocking(move || store.root_run_id(&start))
                .await
                .ok()
                .and_then(Result::ok)
                .or_else(|| ctx.parent_run_id.map(str::to_string))
                .unwrap_or_else(|| ctx.run_id.to_string());
            let dedupe = crate::notify::Dedupe {
                store: ctx.inner.store.clone(),
                root,
                run_id: ctx.run_id.to_string(),
                step_key: step.to_string(),
            };
            crate::notify::deliver(
                &ctx.inner.http,
                &ctx.inner.config,
                *channel,
                crate::notify::Message::Text {
                    text,
                    parse_mode: parse_mode.as_deref(),
                },
                Some(&dedupe),
            )
            .await
            .map(|value| StepOutput {
                value,
                provider: Some(channel.as_str().into()),
                ..Default::default()
            })
        }
    }
}

/// Models often wrap JSON in a Markdown fence; accept that, refuse anything else.
/// The error of a node with `"failOnTruncation": true` whose answer was cut off. Not retried:
/// the same call stops at the same limit.
fn truncated(max_tokens: Option<u32>, text: &str) -> StepError {
    let limit = match max_tokens {
        Some(n) => format!("its maxTokens ({n}) or the server's context size"),
        None => "the server's context size (or its own token limit)".to_string(),
    };
    StepError::new(
        ErrorKind::InvalidRequest,
        format!(
            "the model's answer was cut off after {} characters (finish_reason: length) at {limit}, \
             and the node has \"failOnTruncation\": true; raise maxTokens, shorten the prompt, or \
             give the server a larger context (llama-server: -c, shared among its -np slots)",
            text.chars().count()
        ),
    )
}

fn parse_model_json(text: &str) -> Result<Value, StepError> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .map(|s| s.trim_end().trim_end_matches("```"))
        .unwrap_or(t)
        .trim();
    serde_json::from_str(t).map_err(|e| {
        StepError::new(
            ErrorKind::BadResponse,
            format!("the model's answer is not valid JSON ({e}); ask for JSON only in the prompt, or use parse: \"text\""),
        )
    })
}

/// The sandbox's answer to an HTTP node without a `sandboxOutput`: nothing leaves the
/// machine, and the answer has the type the node would get (JSON for `response: "json"`, a page
/// otherwise).
fn simulated_reply(url: &str, response: &str) -> Value {
    if response == "json" {
        return json!({
            "simulated": true,
            "url": url,
            "note": "simulated by the OmniFlow sandbox; give the node a sandboxOutput with a real reply's shape"
        });
    }
    Value::String(format!(
        "<html><head><title>Simulated page</title></head><body><h1>{url}</h1><p>This page was \
         simulated by the OmniFlow sandbox; nothing left the machine. A real run fetches {url}.</p>\
         </body></html>"
    ))
}

async fn http_call(
    ctx: &AttemptEnv<'_>,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&Value>,
    response: &str,
) -> Result<StepOutput, StepError> {
    let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| {
        StepError::new(
            ErrorKind::InvalidRequest,
            format!("unknown HTTP method {method:?}"),
        )
    })?;
    let mut rb = ctx.inner.http.request(m, url);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    match body {
        Some(Value::String(s)) => rb = rb.body(s.clone()),
        Some(v) => rb = rb.json(v),
        None => {}
    }
    let resp = rb.send().await.map_err(|e| classify_reqwest(&e, url))?;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    let retry_after = crate::retry::retry_after_header(resp.headers());
    let bytes = read_capped(resp, url).await?;
    let text = String::from_utf8_lossy(&bytes).to_string();
    if !status.is_success() {
        return Err(classify_status(status.as_u16(), retry_after, &text, url));
    }
    let value = match response {
        "text" => Value::String(text),
        "json" => parse_json_reply(&text, url)?,
        _ if is_json => parse_json_reply(&text, url)?,
        _ => Value::String(text),
    };
    Ok(StepOutput {
        value,
        provider: Some("http".into()),
        ..Default::default()
    })
}

fn parse_json_reply(text: &str, url: &str) -> Result<Value, StepError> {
    serde_json::from_str(text).map_err(|e| {
        StepError::new(
            ErrorKind::BadResponse,
            format!("{url} answered with invalid JSON ({e})"),
        )
    })
}

async fn read_capped(mut resp: reqwest::Response, url: &str) -> Result<Vec<u8>, StepError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify_reqwest(&e, url))? {
        if out.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(StepError::new(
                ErrorKind::BadResponse,
                format!(
                    "{url} answered with more than {} MiB; refused",
                    MAX_BODY_BYTES >> 20
                ),
            ));
        }
        let before = out.len();
        out.extend_from_slice(&chunk);
        crate::limits::memory::grown(before, out.len())
            .map_err(|m| StepError::new(ErrorKind::InvalidRequest, format!("{url}: {m}")))?;
    }
    Ok(out)
}

/// Maps an HTTP error status to an error kind with a message.
pub(crate) fn classify_status(
    status: u16,
    retry_after: Option<Duration>,
    body: &str,
    url: &str,
) -> StepError {
    let snippet: String = body.trim().chars().take(200).collect();
    let kind = match status {
        429 => ErrorKind::RateLimited,
        408 => ErrorKind::Timeout,
        401 | 403 => ErrorKind::Auth,
        500..=599 => ErrorKind::Server,
        _ => ErrorKind::InvalidRequest,
    };
    let mut e = StepError::new(kind, format!("{url} answered HTTP {status}: {snippet}"));
    e.retry_after = retry_after;
    e
}

/// Maps a transport error; the URL is taken out of reqwest's text (it may hold a token).
pub(crate) fn classify_reqwest(e: &reqwest::Error, url: &str) -> StepError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() || e.is_request() {
        ErrorKind::Network
    } else if e.is_decode() || e.is_body() {
        ErrorKind::BadResponse
    } else {
        ErrorKind::Network
    };
    let mut text = e.to_string();
    if let Some(u) = e.url() {
        text = text.replace(u.as_str(), "");
    }
    let source = std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    StepError::new(
        kind,
        format!("request to {url} failed ({}{source})", text.trim()),
    )
}
