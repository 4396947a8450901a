//! Themes: a struct of *semantic* colours (what a colour means, not which it is). Panes ask
//! `theme.run_status(..)` or `theme.ok`, never a raw colour.
//!
//! A theme file (`themes/NAME.toml`) is a *patch* over the built-in default: every key is
//! optional, so a theme can change one colour. A broken file (bad TOML, unknown key, a colour
//! that does not parse) is reported in the console and the default is used instead.
//!
//! The three bundled themes are also compiled in, so `--theme light` works from any directory.

use crate::events::{RunStatus, StepStatus};
use ratatui::style::{Color, Modifier, Style};
use serde::Deserialize;
use std::path::Path;
use std::str::FromStr;

/// The bundled themes, in the order the theme key cycles through them.
pub const BUILTIN: [(&str, &str); 3] = [
    ("dark", include_str!("../../themes/dark.toml")),
    ("light", include_str!("../../themes/light.toml")),
    (
        "high-contrast",
        include_str!("../../themes/high-contrast.toml"),
    ),
];

/// Resolved colours.
#[derive(Debug, Clone, PartialEq)]
pub struct Theme {
    pub name: String,
    pub text: Color,
    pub dim: Color,
    pub title: Color,
    pub border: Color,
    pub border_focus: Color,
    pub selection_fg: Color,
    pub selection_bg: Color,
    pub ok: Color,
    pub error: Color,
    pub warn: Color,
    pub running: Color,
    pub queued: Color,
    pub cancelled: Color,
    pub gauge: Color,
    pub gauge_hold: Color,
    pub spark_ok: Color,
    pub spark_err: Color,
    pub key: Color,
    /// The whole console's background. `Reset` keeps the terminal's own; a theme whose text
    /// is dark (light) sets one, so it stays legible on a dark terminal too.
    pub background: Color,
}

impl Default for Theme {
    fn default() -> Self {
        Theme {
            name: "dark".into(),
            text: Color::Reset,
            dim: Color::DarkGray,
            title: Color::Cyan,
            border: Color::DarkGray,
            border_focus: Color::Cyan,
            selection_fg: Color::Black,
            selection_bg: Color::Cyan,
            ok: Color::Green,
            error: Color::LightRed,
            warn: Color::Yellow,
            running: Color::LightBlue,
            queued: Color::Magenta,
            cancelled: Color::Gray,
            gauge: Color::Green,
            gauge_hold: Color::LightRed,
            spark_ok: Color::Green,
            spark_err: Color::LightRed,
            key: Color::Yellow,
            background: Color::Reset,
        }
    }
}

/// A theme file: every colour optional (a patch over the default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThemePatch {
    text: Option<String>,
    dim: Option<String>,
    title: Option<String>,
    border: Option<String>,
    border_focus: Option<String>,
    selection_fg: Option<String>,
    selection_bg: Option<String>,
    ok: Option<String>,
    error: Option<String>,
    warn: Option<String>,
    running: Option<String>,
    queued: Option<String>,
    cancelled: Option<String>,
    gauge: Option<String>,
    gauge_hold: Option<String>,
    spark_ok: Option<String>,
    spark_err: Option<String>,
    key: Option<String>,
    background: Option<String>,
}

impl Theme {
    /// Parses a theme file's text as a patch over the default. The error says what to fix.
    pub fn from_toml(name: &str, text: &str) -> Result<Theme, String> {
        let patch: ThemePatch = toml::from_str(text).map_err(|e| {
            format!(
                "theme \"{name}\" is not valid: {}",
                e.to_string().trim().replace('\n', " ")
            )
        })?;
        let mut t = Theme {
            name: name.to_string(),
            ..Theme::default()
        };
        let mut bad = Vec::new();
        let mut set = |slot: &mut Color, key: &str, v: &Option<String>| {
            if let Some(v) = v {
                match Color::from_str(v) {
                    Ok(c) => *slot = c,
                    Err(_) => bad.push(format!("{key} = {v:?}")),
                }
            }
        };
        set(&mut t.text, "text", &patch.text);
        set(&mut t.dim, "dim", &patch.dim);
        set(&mut t.title, "title", &patch.title);
        set(&mut t.border, "border", &patch.border);
        set(&mut t.border_focus, "border_focus", &patch.border_focus);
        set(&mut t.selection_fg, "selection_fg", &patch.selection_fg);
        set(&mut t.selection_bg, "selection_bg", &patch.selection_bg);
        set(&mut t.ok, "ok", &patch.ok);
        set(&mut t.error, "error", &patch.error);
        set(&mut t.warn, "warn", &patch.warn);
        set(&mut t.running, "running", &patch.running);
        set(&mut t.queued, "queued", &patch.queued);
        set(&mut t.cancelled, "cancelled", &patch.cancelled);
        set(&mut t.gauge, "gauge", &patch.gauge);
        set(&mut t.gauge_hold, "gauge_hold", &patch.gauge_hold);
        set(&mut t.spark_ok, "spark_ok", &patch.spark_ok);
        set(&mut t.spark_err, "spark_err", &patch.spark_err);
        set(&mut t.key, "key", &patch.key);
        set(&mut t.background, "background", &patch.background);
        if !bad.is_empty() {
            return Err(format!(
                "theme \"{name}\": unknown colour {} (use a name such as light_red or \"#rrggbb\")",
                bad.join(", ")
            ));
        }
        Ok(t)
    }

    /// Loads `dir/NAME.toml`, else the bundled theme of that name. On any problem: the default
    /// theme and a message for the user.
    pub fn load(name: &str, dir: &Path) -> (Theme, Option<String>) {
        let file = dir.join(format!("{name}.toml"));
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => Some(t),
            Err(_) => BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.to_string()),
        };
        match text {
            None => (
                Theme::default(),
                Some(format!(
                    "no theme \"{name}\" ({} does not exist; bundled: dark, light, high-contrast) — using dark",
                    file.display()
                )),
            ),
            Some(text) => match Theme::from_toml(name, &text) {
                Ok(t) => (t, None),
                Err(e) => (Theme::default(), Some(format!("{e} — using dark"))),
            },
        }
    }

    pub fn base(&self) -> Style {
        Style::default().fg(self.text)
    }
    /// The console's canvas: the text colour on the theme's background.
    pub fn canvas(&self) -> Style {
        Style::default().fg(self.text).bg(self.background)
    }
    pub fn dimmed(&self) -> Style {
        Style::default().fg(self.dim)
    }
    pub fn selected(&self) -> Style {
        Style::default()
            .fg(self.selection_fg)
            .bg(self.selection_bg)
            .add_modifier(Modifier::BOLD)
    }
    pub fn border(&self, focused: bool) -> Style {
        Style::default().fg(if focused {
            self.border_focus
        } else {
            self.border
        })
    }
    pub fn title(&self, focused: bool) -> Style {
        let s = Style::default().fg(self.title);
        if focused {
            s.add_modifier(Modifier::BOLD)
        } else {
            s
        }
    }
    pub fn keycap(&self) -> Style {
        Style::default().fg(self.key).add_modifier(Modifier::BOLD)
    }
    pub fn run_status(&self, s: RunStatus) -> Style {
        Style::default().fg(match s {
            RunStatus::Queued => self.queued,
            RunStatus::Running => self.running,
            RunStatus::Success => self.ok,
            RunStatus::Error => self.error,
            RunStatus::Cancelled => self.cancelled,
        })
    }
    pub fn step_status(&self, s: StepStatus) -> Style {
        Style::default().fg(match s {
            StepStatus::Pending => self.queued,
            StepStatus::Running => self.running,
            StepStatus::Retrying => self.warn,
            StepStatus::Success => self.ok,
            StepStatus::Error => self.error,
            StepStatus::Skipped | StepStatus::Cancelled => self.cancelled,
        })
    }
    pub fn level(&self, level: &str) -> Style {
        Style::default().fg(match level {
            "ERROR" => self.error,
            "WARN" => self.warn,
            "INFO" => self.text,
            _ => self.dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_themes_parse() {
        for (name, text) in BUILTIN {
            Theme::from_toml(name, text).unwrap();
        }
    }

    #[test]
    fn a_patch_changes_only_its_keys() {
        let t = Theme::from_toml("x", "ok = \"#010203\"").unwrap();
        assert_eq!(t.ok, Color::Rgb(1, 2, 3));
        assert_eq!(t.error, Theme::default().error);
    }

    #[test]
    fn broken_files_say_what_is_wrong_and_fall_back() {
        let e = Theme::from_toml("x", "ok = \"chartreuse-ish\"").unwrap_err();
        assert!(e.contains("ok = \"chartreuse-ish\""), "{e}");
        let e = Theme::from_toml("x", "okk = \"red\"").unwrap_err();
        assert!(e.contains("not valid"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.toml"), "text = [").unwrap();
        let (t, msg) = Theme::load("bad", dir.path());
        assert_eq!(t, Theme::default());
        assert!(msg.unwrap().contains("using dark"));
        let (t, msg) = Theme::load("light", dir.path());
        assert_eq!(t.name, "light");
        assert!(msg.is_none());
    }
}
