//! Cutting text to fit a terminal column or a message: by display width (a CJK character or
//! an emoji takes two columns), never in the middle of a character, the cut marked with `…`.
//! The one helper the console, the progress display and the summaries share.

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// Columns `s` takes on a terminal.
pub fn width(s: &str) -> usize {
    UnicodeWidthStr::width(s)
}

/// `s` in at most `cols` columns: whole when it fits, else cut with `…` as the last column.
pub fn clip(s: &str, cols: usize) -> String {
    if width(s) <= cols {
        return s.to_string();
    }
    if cols == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > cols - 1 {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

/// `s` in at most `n` characters (not columns): for services whose limits count characters
/// (Telegram, Discord), cut with `…` as the last one.
pub fn clip_chars(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    if n > 0 {
        out.push('…');
    }
    out
}

/// `text` in rows of at most `cols` columns, broken between words (a longer word is cut
/// into rows of its own).
pub fn wrap(text: &str, cols: usize) -> Vec<String> {
    let cols = cols.max(1);
    let mut rows = Vec::new();
    let mut row = String::new();
    for word in text.split_whitespace() {
        let n = width(&row);
        let ww = width(word);
        if n > 0 && n + 1 + ww > cols {
            rows.push(std::mem::take(&mut row));
        }
        if ww > cols {
            // A word longer than a row: cut it.
            let mut piece = String::new();
            for c in word.chars() {
                let cw = c.width().unwrap_or(0);
                if width(&row) + width(&piece) + cw > cols {
                    row.push_str(&piece);
                    rows.push(std::mem::take(&mut row));
                    piece.clear();
                }
                piece.push(c);
            }
            row.push_str(&piece);
            continue;
        }
        if !row.is_empty() {
            row.push(' ');
        }
        row.push_str(word);
    }
    rows.push(row);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_whole_or_cut_with_an_ellipsis_within_the_width() {
        assert_eq!(clip("summarize", 9), "summarize");
        assert_eq!(clip("summarize", 8), "summari…");
        assert_eq!(width(&clip("summarize", 8)), 8);
        assert_eq!(clip("abc", 0), "");
        assert_eq!(clip("abc", 1), "…");
        // Wide characters count twice and are never split.
        assert_eq!(clip("日本語テキスト", 7), "日本語…");
        assert!(width(&clip("日本語テキスト", 6)) <= 6);
        assert_eq!(clip_chars("日本語テキスト", 4), "日本語…");
        assert_eq!(clip_chars("abc", 3), "abc");
    }

    #[test]
    fn wraps_between_words_and_cuts_only_a_longer_word() {
        assert_eq!(
            wrap("retry after 2s as asked", 11),
            ["retry after", "2s as asked"]
        );
        assert_eq!(wrap("abcdefgh", 3), ["abc", "def", "gh"]);
        assert_eq!(wrap("", 5), [""]);
    }
}
