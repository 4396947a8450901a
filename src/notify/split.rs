//! Splitting long texts into messages a service accepts: at most `limit` UTF-16 units each
//! (Telegram counts entity offsets in UTF-16; for Discord's 2000 characters this is the safe
//! side), cut between words, and never inside markup:
//!
//! - HTML (`parseMode: "HTML"`): never inside a tag or an entity; tags still open at a cut are
//!   closed at the end of the part and opened again at the start of the next one.
//! - Markdown (Discord, Telegram's `Markdown`/`MarkdownV2`): a ``` code block open at a cut is
//!   closed (```), and reopened with its language in the next part. Inline markup (`*bold*`)
//!   is not tracked: a cut happens between words, so it only splits a span that contains a
//!   line or word break.
//! - Plain: words only.
//!
//! A single word longer than a part is cut where it must be.

/// How the text is marked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Markup {
    Plain,
    Html,
    Markdown,
}

impl Markup {
    /// The markup of a Telegram `parse_mode`.
    pub fn for_telegram(parse_mode: Option<&str>) -> Markup {
        match parse_mode.map(|p| p.trim().to_ascii_lowercase()).as_deref() {
            Some("html") => Markup::Html,
            Some("markdown") | Some("markdownv2") => Markup::Markdown,
            _ => Markup::Plain,
        }
    }
}

/// Length as Telegram counts it (UTF-16 code units).
pub fn units(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Splits `text` into parts of at most `limit` UTF-16 units (see the module doc).
pub fn split(text: &str, limit: usize, markup: Markup) -> Vec<String> {
    let limit = limit.max(1);
    // Balancing needs room; tiny limits (tests, not services) split words only.
    let markup = if limit < 32 { Markup::Plain } else { markup };
    let mut out = Vec::new();
    let mut rest = text.trim_end().to_string();
    // Bytes at the start of `rest` that are markup reopened from the previous part: a cut
    // must land after them, or nothing would be consumed.
    let mut prefix = 0usize;
    while units(&rest) > limit {
        let mut budget = limit;
        let (cut, close, reopen) = loop {
            let cut = find_cut(&rest, budget, markup, prefix);
            let (close, reopen) = balance(rest[..cut].trim_end(), markup);
            let total = units(rest[..cut].trim_end()) + units(&close);
            if total <= limit || budget <= limit / 2 {
                break (cut, close, reopen);
            }
            budget -= (total - limit).max(1);
        };
        out.push(format!("{}{close}", rest[..cut].trim_end()));
        let tail = rest[cut..].trim_start();
        let mut next = String::new();
        if units(&reopen) < limit / 2 {
            next.push_str(&reopen);
        }
        prefix = next.len();
        next.push_str(tail);
        rest = next;
    }
    let rest = rest.trim_end();
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// Where to cut `rest` (a byte index after `min`, on a char boundary): the last line break
/// (if it keeps at least half the part), else the last space, before `budget` units, outside
/// any tag or entity; else as late as possible outside markup; else at the budget.
fn find_cut(rest: &str, budget: usize, markup: Markup, min: usize) -> usize {
    let mut used = 0usize;
    let mut hard = rest.len();
    let mut in_tag = false;
    let mut entity: Option<usize> = None;
    let (mut newline, mut space, mut safe) = (None, None, None);
    for (i, c) in rest.char_indices() {
        let w = c.len_utf16();
        if used + w > budget {
            hard = i;
            break;
        }
        used += w;
        let outside = !in_tag && entity.is_none();
        if outside && i > min {
            match c {
                '\n' => newline = Some(i),
                ' ' | '\t' => space = Some(i),
                _ => {}
            }
            safe = Some(i);
        }
        if markup == Markup::Html {
            match c {
                '<' if !in_tag => in_tag = true,
                '>' if in_tag => in_tag = false,
                '&' if !in_tag => entity = Some(i),
                ';' => entity = None,
                c if c.is_whitespace() => entity = None,
                _ => {}
            }
            // An `&` that never ends is text, not an entity.
            if entity.is_some_and(|s| i - s > 12) {
                entity = None;
            }
        }
    }
    let hard_ok = !in_tag && entity.is_none() && hard > min;
    match (newline, space) {
        (Some(n), _) if n * 2 >= hard => n,
        (_, Some(s)) => s,
        (Some(n), None) => n,
        (None, None) if hard_ok => hard,
        (None, None) => match safe {
            Some(s) => s,
            // No boundary at all: cut at the budget (at least one char past `min`).
            None => rest[min..]
                .char_indices()
                .nth(1)
                .map(|(i, _)| min + i)
                .unwrap_or(rest.len())
                .max(hard),
        },
    }
}

/// What must be appended to `head` to close its open markup, and prepended to the next part
/// to reopen it.
fn balance(head: &str, markup: Markup) -> (String, String) {
    match markup {
        Markup::Plain => (String::new(), String::new()),
        Markup::Markdown => {
            let mut open: Option<&str> = None;
            for line in head.lines() {
                if line.trim_start().starts_with("```") {
                    open = match open {
                        Some(_) => None,
                        None => Some(line.trim()),
                    };
                }
            }
            match open {
                Some(fence) => ("\n```".to_string(), format!("{fence}\n")),
                None => (String::new(), String::new()),
            }
        }
        Markup::Html => {
            let mut stack: Vec<(String, &str)> = Vec::new();
            let mut at = 0;
            while let Some(lt) = head[at..].find('<') {
                let start = at + lt;
                let Some(gt) = head[start..].find('>') else {
                    break;
                };
                let end = start + gt + 1;
                let inner = head[start + 1..end - 1].trim();
                if let Some(name) = inner.strip_prefix('/') {
                    let name = name.trim().to_ascii_lowercase();
                    if let Some(pos) = stack.iter().rposition(|(n, _)| *n == name) {
                        stack.truncate(pos);
                    }
                } else if !inner.ends_with('/') && !inner.is_empty() {
                    let name = inner
                        .split(|c: char| c.is_whitespace())
                        .next()
                        .unwrap_or("")
                        .to_ascii_lowercase();
                    stack.push((name, &head[start..end]));
                }
                at = end;
            }
            let close = stack.iter().rev().map(|(n, _)| format!("</{n}>")).collect();
            let reopen = stack.iter().map(|(_, t)| *t).collect();
            (close, reopen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_stay_whole_and_parts_respect_the_limit() {
        let text = "word ".repeat(1000);
        let parts = split(&text, 2000, Markup::Plain);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(units(p) <= 2000);
            assert!(!p.starts_with(' ') && !p.ends_with(' '));
            assert!(p.split(' ').all(|w| w == "word"));
        }
        assert_eq!(split("short", 10, Markup::Plain), vec!["short"]);
        assert_eq!(split("", 10, Markup::Plain), vec![""]);
    }

    #[test]
    fn html_tags_are_never_cut_and_stay_balanced() {
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(&format!(
                "<b>item {i}</b> <a href=\"https://x.org/{i}\">link &amp; more</a> "
            ));
        }
        let text = format!("<i>{text}</i>");
        let parts = split(&text, 4096, Markup::Html);
        assert!(parts.len() >= 5, "{}", parts.len());
        for p in &parts {
            assert!(units(p) <= 4096);
            let (close, _) = balance(p, Markup::Html);
            assert!(
                close.is_empty(),
                "unbalanced part ends {:?}",
                &p[p.len() - 40..]
            );
            assert_eq!(p.matches('<').count(), p.matches('>').count());
            assert!(!p.contains("&am ") && !p.ends_with('&'));
        }
        assert!(parts[1].starts_with("<i>"));
    }

    #[test]
    fn code_fences_are_closed_and_reopened() {
        let code: String = (0..300).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Intro\n```rust\n{code}```\nOutro");
        let parts = split(&text, 2000, Markup::Markdown);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(units(p) <= 2000);
            assert_eq!(p.matches("```").count() % 2, 0, "{p}");
        }
        assert!(parts[1].starts_with("```rust\n"));
    }

    #[test]
    fn a_long_word_is_cut_and_utf16_is_counted() {
        let parts = split(&"x".repeat(250), 100, Markup::Plain);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        let emoji = "😀".repeat(100); // 200 UTF-16 units
        for p in split(&emoji, 64, Markup::Html) {
            assert!(units(&p) <= 64);
        }
    }
}
