//! The sandbox-test form and the blueprint editor's helpers.

use super::*;

pub const DISCARD_NOTE: &str = "unsaved changes: Esc again discards them, Ctrl-S saves";

pub(super) fn editor_area(text: &str) -> TextArea<'static> {
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut t = TextArea::new(if lines.is_empty() {
        vec![String::new()]
    } else {
        lines
    });
    t.set_line_number_style(ratatui::style::Style::default().fg(ratatui::style::Color::DarkGray));
    t
}

/// The test variables field: opened at its start, so the first `KEY=` is in view.
pub(super) fn vars_area(lines: Vec<String>) -> TextArea<'static> {
    let lines = if lines.is_empty() {
        vec![String::new()]
    } else {
        lines
    };
    let mut vars = TextArea::new(lines);
    vars.set_placeholder_text("KEY=VALUE, one per line (empty: the blueprint's variables)");
    vars.move_cursor(CursorMove::Top);
    vars.move_cursor(CursorMove::Head);
    vars
}

impl SandboxForm {
    /// The form for `bp`, pre-filled from its `testConfig` (variables as `KEY=VALUE` lines,
    /// the failure rate in percent, 30 when absent).
    pub fn new(bp: Arc<Blueprint>) -> SandboxForm {
        let tc = bp.test_config.clone().unwrap_or_default();
        let lines: Vec<String> = tc
            .variables
            .iter()
            .map(|v| format!("{}={}", v.key, v.value))
            .collect();
        let rate = tc.simulate_failures.unwrap_or(0.3);
        let mut form = SandboxForm {
            blueprint: bp,
            vars: vars_area(lines),
            rate: TextArea::default(),
            field: FormField::Vars,
            error: None,
        };
        form.set_rate(&format!("{}", (rate * 100.0).round()));
        form
    }

    /// Replaces the failure rate's text.
    pub fn set_rate(&mut self, text: &str) {
        let mut rate = TextArea::new(vec![text.to_string()]);
        rate.move_cursor(CursorMove::End);
        self.rate = rate;
    }

    /// The sandbox run this form describes, or what is wrong with it. A value's text is
    /// measured against `max_variable_bytes` (`MAX_VARIABLE_BYTES`) before it is parsed: it
    /// may come from the blueprint's `testConfig`, a string the blueprint's own size check
    /// does not look into, and millions of values in it would take gigabytes to parse.
    pub fn request(&self, max_variable_bytes: usize) -> Result<RunRequest, String> {
        let mut variables = Map::new();
        for (i, line) in self.vars.lines().iter().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let Some((k, v)) = t.split_once('=') else {
                return Err(format!(
                    "line {}: expected KEY=VALUE, e.g. TOPICS=[\"rust\",\"wasm\"]",
                    i + 1
                ));
            };
            let k = k.trim();
            if !self.blueprint.variables.contains_key(k) {
                let declared: Vec<&str> = self
                    .blueprint
                    .variables
                    .keys()
                    .map(String::as_str)
                    .collect();
                return Err(format!(
                    "line {}: {} declares no variable {k} (declared: {})",
                    i + 1,
                    self.blueprint.name,
                    if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.join(", ")
                    }
                ));
            }
            let values = crate::blueprint::count_values(v, crate::blueprint::Format::Json);
            let size = (v.len() as u64)
                .saturating_add(values.saturating_mul(crate::limits::BYTES_PER_VALUE as u64));
            if size > max_variable_bytes as u64 {
                return Err(format!(
                    "line {}: {k} is {} holding {values} values, {} counting {} bytes for each, \
                     over MAX_VARIABLE_BYTES ({}): give a smaller value, or raise MAX_VARIABLE_BYTES",
                    i + 1,
                    crate::limits::human_size(v.len() as u64),
                    crate::limits::human_size(size),
                    crate::limits::BYTES_PER_VALUE,
                    crate::limits::human_bytes(max_variable_bytes),
                ));
            }
            variables.insert(k.to_string(), parse_var_value(v));
        }
        let rate_text = self.rate.lines().join("");
        let rate = parse_rate(&rate_text)?;
        Ok(RunRequest {
            variables,
            sandbox: true,
            simulate_failures: rate,
            trigger: crate::engine::Trigger::Console,
            ..RunRequest::default()
        })
    }
}

/// `30`, `30%` or `0.3` → 0.3.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let t = text.trim().trim_end_matches('%').trim();
    let bad = || {
        format!("failure rate {text:?}: give a percentage from 0 to 100 (30 = 30 % of model calls fail)")
    };
    let v: f64 = t.parse().map_err(|_| bad())?;
    let v = if v > 1.0 || text.contains('%') {
        v / 100.0
    } else {
        v
    };
    if !(0.0..=1.0).contains(&v) || v.is_nan() {
        return Err(bad());
    }
    Ok(v)
}
