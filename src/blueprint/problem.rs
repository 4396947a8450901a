//! A problem found in a blueprint document, the path that locates it, and "did you mean".

use serde::Serialize;
use std::fmt;

/// One problem in a blueprint, located by its path in the document.
///
/// `path` looks like `nodes[2].needs[0]`; the document itself is `""`, and then `Display`
/// shows only the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    /// A problem at `path` (`""` for the whole document).
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// One step of a path into a JSON document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A path into a JSON document, displayed as `nodes[2].needs[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct JPath(pub(crate) Vec<Seg>);

impl JPath {
    pub(crate) fn root() -> Self {
        JPath(Vec::new())
    }

    pub(crate) fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }

    pub(crate) fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    /// The node index when the path is inside `nodes[i]`.
    pub(crate) fn node_index(&self) -> Option<usize> {
        match self.0.as_slice() {
            [Seg::Key(k), Seg::Index(i), ..] if k == "nodes" => Some(*i),
            _ => None,
        }
    }

    pub(crate) fn parent(&self) -> Option<Self> {
        let mut p = self.clone();
        p.0.pop().map(|_| p)
    }
}

impl fmt::Display for JPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) if is_identifier(k) => {
                    if n > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                // Keys that are not identifiers (variable names with spaces, header names
                // with dashes) are quoted so the path stays unambiguous.
                Seg::Key(k) => write!(f, "[{k:?}]")?,
            }
        }
        Ok(())
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`: what `nodes.ID.output` needs of an id.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// How many candidates the suggestions of one validation may look at in all. A blueprint of
/// 10,000 nodes that names 10,000 missing ones would otherwise compare every pair (10^8 edit
/// distances: most of a minute); past the budget its problems are still all reported, only
/// without a "did you mean". A usual blueprint looks at a few thousand.
const SUGGESTION_BUDGET: usize = 250_000;

thread_local! {
    /// Looks left in the validation running on this thread; `None` outside one (no limit).
    static LOOKS_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (one validation) with its own [`SUGGESTION_BUDGET`].
pub(crate) fn with_suggestion_budget<T>(f: impl FnOnce() -> T) -> T {
    let before = LOOKS_LEFT.with(|l| l.replace(Some(SUGGESTION_BUDGET)));
    let out = f();
    LOOKS_LEFT.with(|l| l.set(before));
    out
}

/// Takes one look from the running validation's budget; false once it is spent.
fn take_look() -> bool {
    LOOKS_LEFT.with(|l| match l.get() {
        None => true,
        Some(0) => false,
        Some(n) => {
            l.set(Some(n - 1));
            true
        }
    })
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
///
/// Case, `_` and `-` differences count as an exact match (`max_tokens` → `maxTokens`).
pub(crate) fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    // Characters that count, without building the normalised text: candidates whose length
    // alone puts them out of reach are passed over cheaply.
    let counted = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .count()
    };
    let w = norm(word);
    let w_len = w.chars().count();
    let limit = match w_len {
        0..=3 => 1,
        4..=8 => 2,
        _ => 3,
    };
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        if !take_look() {
            break;
        }
        if c == word || counted(c).abs_diff(w_len) > limit {
            continue;
        }
        let d = levenshtein(&w, &norm(c));
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// ` — did you mean "x"?` or nothing.
pub(crate) fn suggestion<'a, I>(word: &str, candidates: I) -> String
where
    I: IntoIterator<Item = &'a str>,
{
    did_you_mean(word, candidates)
        .map(|c| format!(" — did you mean \"{c}\"?"))
        .unwrap_or_default()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_display_like_the_document() {
        let p = JPath::root().key("nodes").index(2).key("needs").index(0);
        assert_eq!(p.to_string(), "nodes[2].needs[0]");
        assert_eq!(JPath::root().to_string(), "");
        assert_eq!(
            JPath::root().key("variables").key("my var").to_string(),
            "variables[\"my var\"]"
        );
        assert_eq!(p.node_index(), Some(2));
    }

    #[test]
    fn suggestions_catch_typos_but_not_strangers() {
        let c = ["prompt", "system", "maxTokens"];
        assert_eq!(did_you_mean("promt", c), Some("prompt"));
        assert_eq!(did_you_mean("max_tokens", c), Some("maxTokens"));
        assert_eq!(did_you_mean("banana", c), None);
        assert_eq!(
            did_you_mean("sumarize", ["summarize", "digest"]),
            Some("summarize")
        );
        assert_eq!(
            suggestion("TOPIC", ["TOPICS"]),
            " — did you mean \"TOPICS\"?"
        );
    }

    #[test]
    fn problems_display_with_and_without_path() {
        assert_eq!(Problem::new("", "bad").to_string(), "bad");
        assert_eq!(Problem::new("nodes[0]", "bad").to_string(), "nodes[0]: bad");
        assert!(is_identifier("_a1") && !is_identifier("1a") && !is_identifier("a-b"));
    }
}
