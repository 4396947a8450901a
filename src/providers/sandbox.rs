//! The sandbox's simulated model: deterministic text derived from the prompt, a realistic
//! latency, and — with a failure rate — injected failures of every kind a free model API
//! produces, reproducible for a seed.
//!
//! The failures go through exactly the production retry path: they are ordinary
//! [`StepError`]s with the same kinds and provider hints as the real clients produce.

use super::{AttemptKey, LlmReply, LlmRequest, Progress};
use crate::error::{ErrorKind, StepError};
use std::time::Duration;

/// A simulated model for one run.
#[derive(Debug, Clone)]
pub struct SimulatedModel {
    failure_rate: f64,
    seed: u64,
    /// Fixed latency, or `None` for 200–800 ms varying with the prompt.
    latency: Option<Duration>,
    /// Multiplies the latency (tests shrink it).
    time_scale: f64,
    /// The timeout the simulated timeout pretends to have hit, for its message.
    request_timeout: Duration,
}

/// What the simulated model does on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Answer(String),
    Fail(StepError),
}

impl SimulatedModel {
    pub fn new(failure_rate: f64, seed: u64, latency: Option<Duration>) -> SimulatedModel {
        SimulatedModel {
            failure_rate: failure_rate.clamp(0.0, 1.0),
            seed,
            latency,
            time_scale: 1.0,
            request_timeout: Duration::from_secs(300),
        }
    }

    pub fn with_time_scale(mut self, scale: f64) -> Self {
        self.time_scale = scale;
        self
    }

    pub fn with_request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    pub fn failure_rate(&self) -> f64 {
        self.failure_rate
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The latency of a call with this prompt, before scaling.
    pub fn latency_for(&self, prompt: &str) -> Duration {
        self.latency
            .unwrap_or_else(|| Duration::from_millis(200 + fnv(prompt.as_bytes()) % 600))
    }

    /// Decides the attempt's outcome without waiting (pure; used by `complete` and tests).
    pub fn outcome(&self, req: &LlmRequest, key: AttemptKey<'_>) -> Outcome {
        let mut rng = SplitMix::new(
            self.seed ^ fnv(key.step.as_bytes()) ^ (key.attempt as u64).wrapping_mul(0x9E37_79B9),
        );
        if self.failure_rate > 0.0 && rng.unit() < self.failure_rate {
            return Outcome::Fail(self.failure(&mut rng, req));
        }
        Outcome::Answer(answer_about(
            &req.prompt,
            &req.model,
            req.subject.as_deref(),
            self.seed,
        ))
    }

    fn failure(&self, rng: &mut SplitMix, req: &LlmRequest) -> StepError {
        match rng.below(5) {
            0 => {
                let t = 2.0 + rng.unit() * 4.0;
                StepError::new(
                    ErrorKind::ModelLoading,
                    format!(
                        "model {} is currently loading (simulated 503); this is normal for a \
                         model that was not used recently (the provider asks for a {t:.1}s wait)",
                        req.model
                    ),
                )
                .with_retry_after(crate::limits::secs_f64(t))
            }
            1 => {
                let t = 1 + rng.below(3);
                StepError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "rate limit reached (simulated 429; the provider asks for a {t}s wait); \
                         a local model has no limit: USE_OLLAMA=true"
                    ),
                )
                .with_retry_after(Duration::from_secs(t))
            }
            2 => StepError::new(
                ErrorKind::Timeout,
                format!(
                    "the model call timed out (simulated at once: a real call gives up after \
                     REQUEST_TIMEOUT={}s); raise REQUEST_TIMEOUT if the model is just slow",
                    self.request_timeout.as_secs()
                ),
            ),
            3 => StepError::new(
                ErrorKind::Server,
                "the provider answered 502 Bad Gateway (simulated server error)",
            ),
            _ => StepError::new(
                ErrorKind::EmptyOutput,
                "the model returned an empty answer (simulated)",
            ),
        }
    }

    /// Waits the simulated latency, then answers or fails. An answer streams in meanwhile
    /// as a real one does: `progress` hears its tokens so far, every quarter second or so.
    pub async fn complete(
        &self,
        req: &LlmRequest,
        key: AttemptKey<'_>,
        progress: Progress<'_>,
    ) -> Result<LlmReply, StepError> {
        let latency = crate::limits::scale(self.latency_for(&req.prompt), self.time_scale);
        let outcome = self.outcome(req, key);
        match (&outcome, progress) {
            (Outcome::Answer(text), Some(told)) if !latency.is_zero() => {
                let total = estimate_tokens(text);
                let parts = (latency.as_millis() / 250).clamp(1, 40) as u32;
                for part in 1..=parts {
                    tokio::time::sleep(latency / parts).await;
                    told(total * u64::from(part) / u64::from(parts));
                }
            }
            _ if !latency.is_zero() => tokio::time::sleep(latency).await,
            _ => {}
        }
        match outcome {
            Outcome::Fail(e) => Err(e),
            Outcome::Answer(text) => {
                let tokens = estimate_tokens(&req.prompt) + estimate_tokens(&text);
                Ok(LlmReply {
                    text,
                    tokens_used: Some(tokens),
                    provider: "sandbox".into(),
                    model: req.model.clone(),
                    cached: false,
                    fallback: None,
                    reply_model: None,
                    finish_reason: None,
                })
            }
        }
    }
}

/// Roughly 4 characters a token, as most tokenizers average on English.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// The simulated answer: if the prompt asks for "one of: a, b, c" it picks one of those (so
/// classify-and-route blueprints can be tried); otherwise two sentences built around the
/// prompt's own keywords.
pub fn answer(prompt: &str, model: &str) -> String {
    answer_about(prompt, model, None, 0)
}

/// Like [`answer`], about `subject` (a fan-out item) when given. A "one of" choice also
/// depends on the run's seed, so `--seed` walks a classify-and-route blueprint's branches.
pub fn answer_about(prompt: &str, model: &str, subject: Option<&str>, seed: u64) -> String {
    let h = fnv(prompt.as_bytes()) ^ fnv(model.as_bytes());
    if let Some(options) = one_of(prompt) {
        let pick = SplitMix::new(h ^ seed).next_u64();
        return options[(pick % options.len() as u64) as usize].clone();
    }
    let mut words = Vec::new();
    if let Some(s) = subject.filter(|s| !s.trim().is_empty()) {
        // The subject itself first, then its own distinctive words.
        words.push(s.trim().to_string());
        words.extend(keywords(s).into_iter().filter(|w| w.len() > 3));
    }
    if words.len() < 3 {
        words.extend(keywords(prompt));
    }
    let k = |i: usize| -> String {
        if words.is_empty() {
            "this topic".to_string()
        } else {
            words[(h as usize / 7 + i) % words.len()].clone()
        }
    };
    const OPENERS: [&str; 6] = [
        "{a} is moving quickly, and most of the attention this month is on {b}.",
        "Teams adopting {a} report fewer surprises once {b} is in place.",
        "The short version: {a} matters because it changes how people think about {b}.",
        "{a} keeps improving, with recent work focused on {b}.",
        "Interest in {a} grew steadily this year, driven largely by {b}.",
        "Practitioners describe {a} as practical today, especially around {b}.",
    ];
    const CLOSERS: [&str; 5] = [
        "Expect more tooling and clearer best practices around {c} soon.",
        "The open question is how {c} will hold up at scale.",
        "Watch {c}: it is where the next improvements are likely to land.",
        "For most readers, the practical takeaway concerns {c}.",
        "Early results around {c} look promising but are not settled yet.",
    ];
    let cap = |s: String| {
        let mut c = s.chars();
        match c.next() {
            Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
            None => s,
        }
    };
    let a = OPENERS[(h % OPENERS.len() as u64) as usize]
        .replace("{a}", &k(0))
        .replace("{b}", &k(1));
    let b = CLOSERS[((h >> 8) % CLOSERS.len() as u64) as usize].replace("{c}", &k(2));
    format!("{} {}", cap(a), b)
}

/// The simulated answer of a node that parses JSON. When the prompt (or system text) shows
/// the object it wants, the answer has the same keys with values of the same types; otherwise
/// it is `{"answer": text}`. Every other answer comes wrapped in a Markdown fence, as real
/// models often do, so the fence stripping is exercised too.
pub fn json_answer(req: &LlmRequest, text: &str) -> String {
    let h = fnv(req.prompt.as_bytes()) ^ fnv(req.model.as_bytes());
    let example = [Some(req.prompt.as_str()), req.system.as_deref()]
        .into_iter()
        .flatten()
        .find_map(example_object);
    let options = one_of(&req.prompt);
    let value = match example {
        Some(shape) => {
            let mut rng = SplitMix::new(h);
            fill_like(&shape, text, options.as_deref(), &mut rng, 0)
        }
        None => serde_json::json!({ "answer": text }),
    };
    let body = value.to_string();
    if h & 1 == 1 {
        format!("```json\n{body}\n```")
    } else {
        body
    }
}

/// The first JSON object written out in `text`, if any (only the first few `{` are tried, so a
/// prompt full of braces costs no more than a short one).
fn example_object(text: &str) -> Option<serde_json::Value> {
    text.match_indices('{').take(16).find_map(|(i, _)| {
        let mut values =
            serde_json::Deserializer::from_str(&text[i..]).into_iter::<serde_json::Value>();
        match values.next() {
            Some(Ok(v @ serde_json::Value::Object(_))) => Some(v),
            _ => None,
        }
    })
}

/// A value shaped like `shape`: strings from the answer (or one of the prompt's options),
/// numbers in the same range, the same keys and nesting.
fn fill_like(
    shape: &serde_json::Value,
    text: &str,
    options: Option<&[String]>,
    rng: &mut SplitMix,
    depth: usize,
) -> serde_json::Value {
    use serde_json::Value;
    match shape {
        _ if depth > 8 => Value::Null,
        Value::Null => Value::Null,
        Value::Bool(_) => Value::Bool(rng.below(2) == 1),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(1.0).abs().max(1.0);
            serde_json::json!((rng.unit() * f * 100.0).round() / 100.0)
        }
        Value::Number(n) => {
            let top = n.as_u64().unwrap_or(10).clamp(1, 1_000_000);
            serde_json::json!(rng.below(top + 1))
        }
        Value::String(_) => match options {
            Some(o) if !o.is_empty() => {
                Value::String(o[rng.below(o.len() as u64) as usize].clone())
            }
            _ => Value::String(
                text.split_inclusive(". ")
                    .next()
                    .unwrap_or(text)
                    .trim()
                    .to_string(),
            ),
        },
        Value::Array(items) => Value::Array(
            items
                .first()
                .map(|first| fill_like(first, text, options, rng, depth + 1))
                .into_iter()
                .collect(),
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), fill_like(v, text, options, rng, depth + 1)))
                .collect(),
        ),
    }
}

fn one_of(prompt: &str) -> Option<Vec<String>> {
    let lower = prompt.to_lowercase();
    let at = lower.find("one of")?;
    let rest = &prompt[at + "one of".len()..];
    let rest = rest.trim_start_matches([':', ' ']);
    let line = rest.split(['\n', '.']).next()?;
    let options: Vec<String> = line
        .split([',', '|', '/'])
        .flat_map(|p| p.split(" or "))
        .map(|o| {
            o.trim()
                .trim_matches(|c: char| !c.is_alphanumeric() && c != '_' && c != '-')
                .to_string()
        })
        .filter(|o| !o.is_empty() && !o.contains(' '))
        .collect();
    (options.len() >= 2).then_some(options)
}

fn keywords(prompt: &str) -> Vec<String> {
    const STOP: [&str; 24] = [
        "about",
        "with",
        "that",
        "this",
        "from",
        "into",
        "your",
        "their",
        "what",
        "which",
        "write",
        "sentences",
        "sentence",
        "summarise",
        "summarize",
        "short",
        "please",
        "give",
        "answer",
        "words",
        "following",
        "text",
        "only",
        "there",
    ];
    let mut out: Vec<String> = Vec::new();
    for w in prompt.split(|c: char| !c.is_alphanumeric() && c != '-' && c != '+') {
        let lw = w.to_lowercase();
        if lw.len() >= 3
            && !STOP.contains(&lw.as_str())
            && !out.iter().any(|o| o.to_lowercase() == lw)
        {
            out.push(w.to_string());
        }
    }
    out
}

/// FNV-1a: a stable hash (std's hasher may change between Rust versions, which would change
/// what a seed reproduces).
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A tiny deterministic generator (SplitMix64).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated model reports the failure rate it injects (kept between 0 and 1) and its
    /// seed, all 64 bits of it.
    #[test]
    fn the_rate_is_clamped_and_the_seed_kept() {
        let m = |rate| SimulatedModel::new(rate, u64::MAX - 1, None);
        assert_eq!(
            (
                m(0.25).failure_rate(),
                m(1.5).failure_rate(),
                m(-0.5).failure_rate(),
                m(0.25).seed()
            ),
            (0.25, 1.0, 0.0, u64::MAX - 1)
        );
    }

    /// The generator is SplitMix64 (the reference outputs for seed 0), so a seeded sandbox
    /// run's injected failures and fake answers are the same on every machine and release,
    /// and `unit` is uniform: a failure rate of 0.3 injects about 30 %.
    #[test]
    fn the_generator_is_splitmix64_and_uniform() {
        let mut g = SplitMix::new(0);
        assert_eq!(
            [g.next_u64(), g.next_u64(), g.next_u64()],
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F
            ]
        );
        let mut g = SplitMix::new(42);
        let below = (0..10_000).filter(|_| g.unit() < 0.3).count();
        assert!(
            (2_800..3_200).contains(&below),
            "{below} of 10,000 below 0.3"
        );
    }

    /// A sandbox answer is the same on every machine and release for the same prompt, model,
    /// subject and seed (a seeded sandbox run is reproduced, a classify-and-route blueprint
    /// takes the same branches): these are the answers of this release.
    #[test]
    fn sandbox_answers_are_the_same_on_every_release() {
        let prompt = "Vector databases: indexing, embeddings, retrieval.";
        assert_eq!(
            answer(prompt, "m"),
            "Retrieval is moving quickly, and most of the attention this month is on Vector. \
             Early results around databases look promising but are not settled yet."
        );
        assert_eq!(
            answer(prompt, "llama3"),
            "Teams adopting Vector report fewer surprises once databases is in place. Early \
             results around indexing look promising but are not settled yet."
        );
        let picks: Vec<String> = (0..8)
            .map(|seed| answer_about("Answer with one of: urgent, normal, spam", "m", None, seed))
            .collect();
        assert_eq!(
            picks,
            ["urgent", "urgent", "urgent", "spam", "spam", "normal", "normal", "spam"]
        );
    }

    fn req(prompt: &str) -> LlmRequest {
        LlmRequest {
            provider: "sandbox".into(),
            model: "m".into(),
            system: None,
            prompt: prompt.into(),
            temperature: None,
            max_tokens: None,
            subject: None,
        }
    }

    /// A sandbox answer streams in over its latency, as a real one does: its tokens so far,
    /// four times in a second, ending with the whole answer's; a failure streams nothing.
    #[tokio::test(start_paused = true)]
    async fn a_sandbox_answer_streams_its_tokens_over_its_latency() {
        let heard = std::sync::Mutex::new(Vec::new());
        let told = |n: u64| heard.lock().unwrap().push((tokio::time::Instant::now(), n));
        let r = req("Two sentences on rust and wasm.");
        let key = AttemptKey {
            step: "s",
            attempt: 1,
        };
        let start = tokio::time::Instant::now();
        let sim = SimulatedModel::new(0.0, 1, Some(Duration::from_secs(1)));
        let reply = sim.complete(&r, key, Some(&told)).await.unwrap();
        let heard = std::mem::take(&mut *heard.lock().unwrap());
        let total = estimate_tokens(&reply.text);
        assert!(total >= 4, "{total}");
        let counts: Vec<u64> = heard.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            counts,
            [1, 2, 3, 4].map(|i| total * i / 4),
            "a quarter more each time"
        );
        assert_eq!(heard[0].0 - start, Duration::from_millis(250));
        assert_eq!(
            heard[3].0 - start,
            Duration::from_secs(1),
            "the latency is kept"
        );

        let failing = SimulatedModel::new(1.0, 1, Some(Duration::from_secs(1)));
        let none = |_: u64| panic!("a failure streamed tokens");
        assert!(failing.complete(&r, key, Some(&none)).await.is_err());
    }

    /// A sandbox answer counts its tokens as a real one without usage would: the prompt's
    /// and the answer's, so budgets can be tried in the sandbox.
    #[tokio::test]
    async fn a_sandbox_answer_counts_the_prompt_and_the_answer() {
        let sim = SimulatedModel::new(0.0, 1, Some(Duration::ZERO));
        let r = req("Two sentences on rust and wasm.");
        let key = AttemptKey {
            step: "s",
            attempt: 1,
        };
        let reply = sim.complete(&r, key, None).await.unwrap();
        assert_eq!(
            reply.tokens_used,
            Some(estimate_tokens(&r.prompt) + estimate_tokens(&reply.text))
        );
        assert!(reply.tokens_used.unwrap() > estimate_tokens(&reply.text));
    }

    #[test]
    fn answers_are_deterministic_and_use_the_prompt() {
        let a = answer("Two sentences on rust and wasm.", "m");
        assert_eq!(a, answer("Two sentences on rust and wasm.", "m"));
        assert!(
            a.contains("rust") || a.contains("Rust") || a.contains("wasm"),
            "{a}"
        );
        assert_ne!(a, answer("Two sentences on llm.", "m"));
    }

    /// Without a seed, a classify prompt's choice follows the message: different messages are
    /// sorted into different options, so each branch of a router gets sandbox traffic.
    #[test]
    fn different_messages_are_classified_differently() {
        let picks: std::collections::HashSet<String> = (0..30)
            .map(|i| {
                answer(
                    &format!("Answer with one of: urgent, normal, spam\nMessage: {i}"),
                    "m",
                )
            })
            .collect();
        assert!(picks.len() >= 2, "{picks:?}");
    }

    #[test]
    fn one_of_prompts_get_one_of_the_options() {
        for p in [
            "Classify this. Answer with one of: urgent, normal, spam",
            "Reply with exactly one of urgent | normal | spam.\nMessage: hello",
        ] {
            let a = answer(p, "m");
            assert!(["urgent", "normal", "spam"].contains(&a.as_str()), "{a}");
        }
    }

    #[test]
    fn failures_follow_the_rate_and_the_seed() {
        let sim = SimulatedModel::new(0.3, 42, Some(Duration::ZERO));
        let r = req("x");
        let mut fails = 0;
        let mut kinds = std::collections::HashSet::new();
        for i in 0..2000 {
            let step = format!("s[{i}]");
            let key = AttemptKey {
                step: &step,
                attempt: 1,
            };
            let o = sim.outcome(&r, key);
            assert_eq!(o, sim.outcome(&r, key), "same seed, same outcome");
            if let Outcome::Fail(e) = o {
                fails += 1;
                kinds.insert(e.kind);
            }
        }
        assert!(
            (450..750).contains(&fails),
            "about 30% of 2000, got {fails}"
        );
        assert_eq!(kinds.len(), 5, "every kind is injected: {kinds:?}");
        let other = SimulatedModel::new(0.3, 43, Some(Duration::ZERO));
        let differs = (0..50).any(|i| {
            let step = format!("s[{i}]");
            let key = AttemptKey {
                step: &step,
                attempt: 1,
            };
            sim.outcome(&r, key) != other.outcome(&r, key)
        });
        assert!(differs, "another seed gives other failures");
    }

    #[test]
    fn hints_are_attached_to_loading_and_rate_limits() {
        let sim = SimulatedModel::new(1.0, 7, Some(Duration::ZERO));
        for i in 0..200 {
            let step = format!("s{i}");
            if let Outcome::Fail(e) = sim.outcome(
                &req("x"),
                AttemptKey {
                    step: &step,
                    attempt: 1,
                },
            ) {
                match e.kind {
                    ErrorKind::ModelLoading | ErrorKind::RateLimited => {
                        assert!(e.retry_after.is_some())
                    }
                    _ => assert!(e.retry_after.is_none()),
                }
            }
        }
    }

    #[test]
    fn a_json_node_gets_the_object_its_prompt_shows() {
        let mut r = req("Classify the ticket. Reply with JSON like {\"label\": \"bug\", \"score\": 0.5, \"n\": 3, \"tags\": [\"x\"], \"ok\": true}. Label is one of: bug, feature, question");
        r.model = "m".into();
        let text = json_answer(&r, "Some answer. More words.");
        let body = text
            .trim()
            .trim_start_matches("```json")
            .trim_end_matches("```")
            .trim();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            ["bug", "feature", "question"].contains(&v["label"].as_str().unwrap()),
            "{v}"
        );
        assert!(
            v["score"]
                .as_f64()
                .is_some_and(|f| (0.0..=1.0).contains(&f)),
            "{v}"
        );
        assert!(v["n"].as_u64().is_some_and(|n| n <= 3), "{v}");
        assert!(
            v["tags"]
                .as_array()
                .is_some_and(|a| a.len() == 1 && a[0].is_string()),
            "{v}"
        );
        assert!(v["ok"].is_boolean(), "{v}");
        assert_eq!(
            text,
            json_answer(&r, "Some answer. More words."),
            "deterministic"
        );
    }

    #[test]
    fn without_an_example_the_answer_is_wrapped_and_some_answers_are_fenced() {
        let mut fenced = 0;
        for i in 0..32 {
            let r = req(&format!("Tell me about topic {i} in JSON"));
            let text = json_answer(&r, "Plain words.");
            if text.starts_with("```json\n") {
                fenced += 1;
            }
            let body = text
                .trim_start_matches("```json")
                .trim_end_matches("```")
                .trim();
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v, serde_json::json!({"answer": "Plain words."}));
        }
        assert!(
            (1..32).contains(&fenced),
            "both forms occur: {fenced} of 32 fenced"
        );
    }
}
