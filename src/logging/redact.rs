//! Removing secrets from text before it is written anywhere.
//!
//! Two layers of defence:
//! 1. every configured secret ([`crate::config::Config::secrets`]) is replaced wherever it
//!    appears, also in its JSON-escaped and `Debug`-escaped spellings (a log line is JSON, and
//!    `?field` values are `Debug`-formatted);
//! 2. secret *shapes* are replaced even when nobody listed them: a Telegram bot token
//!    (`bot<digits>:<token>` as in `https://api.telegram.org/bot<TOKEN>/sendMessage`), a
//!    Discord webhook path (`/api/webhooks/<id>/<token>`), `Bearer <token>`, Hugging Face
//!    tokens (`hf_…`), OpenAI-style keys (`sk-…`) and JWTs (`eyJ….….…`, e.g. Supabase keys).
//!
//! The patterns are hand-written scanners rather than regexes: they run on every log line, and
//! each one is a few lines that can be read in full.

use std::borrow::Cow;

/// What a secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Secrets shorter than this are ignored: replacing every "abc" in a log would destroy it and
/// protect nothing (a 3-character token is not a secret).
const MIN_SECRET_LEN: usize = 4;

/// Replaces secrets in text. Cheap to share (`Arc<Redactor>`); [`Redactor::redact`] borrows
/// when nothing needed replacing, which is almost every line.
///
/// ```
/// use omniflow::logging::Redactor;
/// let r = Redactor::new(vec!["s3cret-value".into()]);
/// assert_eq!(r.redact("token=s3cret-value"), "token=[REDACTED]");
/// assert_eq!(
///     r.redact("POST https://api.telegram.org/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage"),
///     "POST https://api.telegram.org/bot[REDACTED]/sendMessage"
/// );
/// ```
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Literal spellings to replace, longest first so a secret that contains another one is
    /// replaced whole.
    literals: Vec<String>,
}

impl Redactor {
    /// A redactor for these secret values (empty and very short values are ignored).
    pub fn new(secrets: Vec<String>) -> Self {
        let mut literals: Vec<String> = Vec::new();
        for secret in secrets {
            if secret.trim().len() < MIN_SECRET_LEN {
                continue;
            }
            // The spellings a secret takes once formatted into a JSON or Debug string.
            let json = serde_json::to_string(&secret)
                .ok()
                .map(|q| q[1..q.len() - 1].to_string());
            let debug = format!("{secret:?}");
            let debug = debug[1..debug.len() - 1].to_string();
            for spelling in [Some(secret), json, Some(debug)].into_iter().flatten() {
                if !literals.contains(&spelling) {
                    literals.push(spelling);
                }
            }
        }
        literals.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { literals }
    }

    /// `s` with every known secret and every secret-shaped token replaced by `[REDACTED]`.
    pub fn redact<'a>(&self, s: &'a str) -> Cow<'a, str> {
        let mut out: Cow<'a, str> = Cow::Borrowed(s);
        for lit in &self.literals {
            if out.contains(lit.as_str()) {
                out = Cow::Owned(out.replace(lit.as_str(), REDACTED));
            }
        }
        match redact_patterns(&out) {
            Some(replaced) => Cow::Owned(replaced),
            None => out,
        }
    }
}

/// One scanner: given the text and a byte position, how many bytes of a secret start there
/// and what replaces them.
type Scanner = fn(&[u8], usize) -> Option<(usize, &'static str)>;

const SCANNERS: [Scanner; 6] = [
    telegram_token,
    discord_webhook,
    bearer,
    hf_token,
    openai_key,
    jwt,
];

/// Which scanners can match at a byte, by the byte's value: each scanner's possible first
/// bytes (`SCANNERS` order as bits). Most bytes of a log line start no pattern at all, so the
/// scan costs one table lookup per byte instead of six calls.
static FIRST: [u8; 256] = {
    let mut t = [0u8; 256];
    // telegram_token: `bot…`, or a digit at a word start.
    t[b'b' as usize] |= 1 << 0;
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] |= 1 << 0;
        d += 1;
    }
    // discord_webhook: `/api/webhooks/`.
    t[b'/' as usize] |= 1 << 1;
    // bearer: `bearer ` in any case.
    t[b'b' as usize] |= 1 << 2;
    t[b'B' as usize] |= 1 << 2;
    // hf_token, openai_key, jwt.
    t[b'h' as usize] |= 1 << 3;
    t[b's' as usize] |= 1 << 4;
    t[b'e' as usize] |= 1 << 5;
    t
};

/// Applies the pattern scanners; `None` when nothing matched (the common case).
fn redact_patterns(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out: Option<String> = None;
    // Start of the text not yet copied into `out`.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let may = FIRST[bytes[i] as usize];
        if may == 0 {
            i += 1;
            continue;
        }
        let hit = SCANNERS
            .iter()
            .enumerate()
            .filter(|(k, _)| may & (1 << k) != 0)
            .find_map(|(_, scan)| scan(bytes, i));
        match hit {
            Some((len, replacement)) => {
                let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
                // Scanners match ASCII only, so `i` and `i + len` are char boundaries.
                o.push_str(&s[copied..i]);
                o.push_str(replacement);
                i += len;
                copied = i;
            }
            None => i += 1,
        }
    }
    if let Some(o) = out.as_mut() {
        o.push_str(&s[copied..]);
    }
    out
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Length of the run of bytes at `from` that satisfy `pred`.
fn run_len(bytes: &[u8], from: usize, pred: fn(u8) -> bool) -> usize {
    bytes
        .get(from..)
        .map_or(0, |rest| rest.iter().take_while(|b| pred(**b)).count())
}

/// True when the byte before `i` cannot be part of a word (so `robot123:` is not `bot123:`).
fn at_word_start(bytes: &[u8], i: usize) -> bool {
    i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')
}

fn starts_with_at(bytes: &[u8], i: usize, prefix: &[u8]) -> bool {
    bytes.get(i..i + prefix.len()) == Some(prefix)
}

/// `bot<digits>:<token>` (Telegram: `bot123456789:AAH…`, token of 30+ characters), or the same
/// token without the `bot` prefix when it is long enough to be unmistakable.
fn telegram_token(bytes: &[u8], i: usize) -> Option<(usize, &'static str)> {
    let (prefix, replacement): (usize, &'static str) = if starts_with_at(bytes, i, b"bot") {
        // `/bot123:…` in a URL: keep `bot` so the URL stays readable.
        (3, "bot[REDACTED]")
    } else if at_word_start(bytes, i) && bytes[i].is_ascii_digit() {
        (0, REDACTED)
    } else {
        return None;
    };
    // `/bot…` in a URL is at a word start too (`/` is not a word character).
    if !at_word_start(bytes, i) {
        return None;
    }
    let digits = run_len(bytes, i + prefix, |b| b.is_ascii_digit());
    if digits < 5 || bytes.get(i + prefix + digits) != Some(&b':') {
        return None;
    }
    let token = run_len(bytes, i + prefix + digits + 1, is_token_byte);
    if token < 30 {
        return None;
    }
    Some((prefix + digits + 1 + token, replacement))
}

/// `/api/webhooks/<id>/<token>` (Discord): both the id and the token go.
fn discord_webhook(bytes: &[u8], i: usize) -> Option<(usize, &'static str)> {
    const PREFIX: &[u8] = b"/api/webhooks/";
    if !starts_with_at(bytes, i, PREFIX) {
        return None;
    }
    let id = run_len(bytes, i + PREFIX.len(), |b| b.is_ascii_digit());
    if id == 0 || bytes.get(i + PREFIX.len() + id) != Some(&b'/') {
        return None;
    }
    let token = run_len(bytes, i + PREFIX.len() + id + 1, is_token_byte);
    if token == 0 {
        return None;
    }
    Some((PREFIX.len() + id + 1 + token, "/api/webhooks/[REDACTED]"))
}

/// `Bearer <token>` (any case), as in an `Authorization` header that got logged.
fn bearer(bytes: &[u8], i: usize) -> Option<(usize, &'static str)> {
    const WORD: &[u8] = b"bearer ";
    let word = bytes.get(i..i + WORD.len())?;
    if !word.eq_ignore_ascii_case(WORD) || !at_word_start(bytes, i) {
        return None;
    }
    let token = run_len(bytes, i + WORD.len(), |b| {
        is_token_byte(b) || matches!(b, b'.' | b'~' | b'+' | b'/' | b'=')
    });
    // "Bearer token" in prose is not a secret; real tokens are long.
    if token < 8 {
        return None;
    }
    Some((WORD.len() + token, "Bearer [REDACTED]"))
}

/// `hf_` followed by 20+ letters and digits (Hugging Face access tokens).
fn hf_token(bytes: &[u8], i: usize) -> Option<(usize, &'static str)> {
    prefixed_token(bytes, i, b"hf_", 20)
}

/// `sk-` followed by 20+ token characters (OpenAI-compatible API keys).
fn openai_key(bytes: &[u8], i: usize) -> Option<(usize, &'static str)> {
    prefixed_token(bytes, i, b"sk-", 20)
}

fn prefixed_token(
    bytes: &[u8],
    i: usize,
    prefix: &[u8],
    min: usize,
) -> Option<(usize, &'static str)> {
    if !starts_with_at(bytes, i, prefix) || !at_word_start(bytes, i) {
        return None;
    }
    let token = run_len(bytes, i + prefix.len(), is_token_byte);
    (token >= min).then_some((prefix.len() + token, REDACTED))
}

/// A JSON Web Token: `eyJ<header>.<payload>.<signature>` (Supabase keys are JWTs).
fn jwt(bytes: &[u8], i: usize) -> Option<(usize, &'static str)> {
    if !starts_with_at(bytes, i, b"eyJ") || !at_word_start(bytes, i) {
        return None;
    }
    let mut len = 0;
    for part in 0..3 {
        let n = run_len(bytes, i + len, is_token_byte);
        if n < 8 {
            return None;
        }
        len += n;
        if part < 2 {
            if bytes.get(i + len) != Some(&b'.') {
                return None;
            }
            len += 1;
        }
    }
    Some((len, REDACTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first-byte table lets every scanner see every byte it could match at: each
    /// scanner, run at every byte of a text full of near-misses, never matches where the
    /// table says it cannot.
    #[test]
    fn the_first_byte_table_misses_no_scanner() {
        let text = "bot123456:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw 123456:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw \
                    /api/webhooks/1/x Bearer abcdefghij bearer abcdefghij BEARER abcdefghij \
                    hf_AbCdEfGhIjKlMnOpQrStUv sk-abcdefghijklmnopqrstuv \
                    eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.dBjftJeZ4CVPmB92K27u";
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for (k, scan) in SCANNERS.iter().enumerate() {
                if scan(bytes, i).is_some() {
                    assert_ne!(FIRST[bytes[i] as usize] & (1 << k), 0, "scanner {k} at {i}");
                }
            }
        }
        assert_eq!(none().redact(text).matches(REDACTED).count(), 9);
    }

    const TG: &str = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";

    fn none() -> Redactor {
        Redactor::new(vec![])
    }

    #[test]
    fn listed_secrets_are_replaced_everywhere() {
        let r = Redactor::new(vec!["tok-one".into(), "tok-one-longer".into()]);
        assert_eq!(
            r.redact("a tok-one b tok-one-longer c tok-one"),
            "a [REDACTED] b [REDACTED] c [REDACTED]"
        );
    }

    #[test]
    fn escaped_spellings_of_a_secret_are_replaced() {
        let secret = r#"pa"ss\word"#;
        let r = Redactor::new(vec![secret.into()]);
        let json = serde_json::to_string(secret).unwrap();
        assert_eq!(r.redact(&json), "\"[REDACTED]\"");
        assert_eq!(r.redact(&format!("{secret:?}")), "\"[REDACTED]\"");
    }

    #[test]
    fn short_and_empty_secrets_are_ignored() {
        let r = Redactor::new(vec!["".into(), "ab".into(), "   ".into()]);
        assert!(matches!(r.redact("ab cd"), Cow::Borrowed("ab cd")));
    }

    #[test]
    fn clean_text_is_borrowed() {
        let r = Redactor::new(vec!["secret-token".into()]);
        assert!(matches!(
            r.redact("step summarize done in 120ms"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn telegram_tokens_are_redacted_without_being_listed() {
        let url = format!("https://api.telegram.org/bot{TG}/sendMessage");
        assert_eq!(
            none().redact(&url),
            "https://api.telegram.org/bot[REDACTED]/sendMessage"
        );
        assert_eq!(none().redact(&format!("token {TG}")), "token [REDACTED]");
        // Not tokens: times, short ids, words ending in "bot".
        for clean in [
            "at 12:34:56",
            "robot12345:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
            "bot12:abc",
        ] {
            assert_eq!(none().redact(clean), clean);
        }
    }

    #[test]
    fn discord_webhooks_are_redacted_without_being_listed() {
        let url = "https://discord.com/api/webhooks/112233445566/AbC-dEf_123xyz?wait=true";
        assert_eq!(
            none().redact(url),
            "https://discord.com/api/webhooks/[REDACTED]?wait=true"
        );
    }

    #[test]
    fn generic_token_shapes_are_redacted() {
        let r = none();
        assert_eq!(
            r.redact("Authorization: Bearer abcdefghijKLMNOP.123"),
            "Authorization: Bearer [REDACTED]"
        );
        assert_eq!(
            r.redact("authorization: bearer abcdefghijKLMNOP"),
            "authorization: Bearer [REDACTED]"
        );
        assert_eq!(
            r.redact("token=hf_AbCdEfGhIjKlMnOpQrStUvWxYz12"),
            "token=[REDACTED]"
        );
        assert_eq!(
            r.redact("key sk-proj-abcdefghijklmnopqrstuv"),
            "key [REDACTED]"
        );
        assert_eq!(
            r.redact("apikey: eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "apikey: [REDACTED]"
        );
        // Prose and identifiers are left alone.
        for clean in [
            "a Bearer token is missing",
            "use_hf_token_from_env",
            "hf_short",
            "task-runner",
        ] {
            assert_eq!(r.redact(clean), clean);
        }
    }

    #[test]
    fn non_ascii_text_survives_redaction() {
        let r = Redactor::new(vec!["sécret-ü".into()]);
        assert_eq!(
            r.redact("résumé sécret-ü → Bearer abcdefghijkl ✓"),
            "résumé [REDACTED] → Bearer [REDACTED] ✓"
        );
    }
}
