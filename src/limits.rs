//! The size budgets of a run: how much one template render may do and build, how many items
//! a fan-out may have, how large a blueprint and its variables may be.
//!
//! One process runs every user's blueprints side by side, so a single hostile or mistaken
//! blueprint must fail its own run with a message naming the budget, never exhaust the
//! process. Each budget has an environment setting (read in [`crate::config`]); the defaults
//! are far above what a real automation needs.
//!
//! A leaf module: it depends on nothing else in the crate.

/// Every size budget, with the defaults below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Instructions one template render may execute (`TEMPLATE_FUEL`).
    pub template_fuel: u64,
    /// Bytes one render may output, counting text captured by `{% set %}` blocks and macros
    /// (`TEMPLATE_MAX_OUTPUT`).
    pub template_max_output: usize,
    /// Bytes of any one value a template builds: a string made with `~`, `+`, `*` or a
    /// filter, a list made with `*`, `+`, `batch`, `list` …, its items counted beside their
    /// content (`TEMPLATE_MAX_VALUE`).
    pub template_max_value: usize,
    /// Items of one `forEach` (`MAX_ITEMS`).
    pub max_items: usize,
    /// Nodes of one blueprint (`MAX_NODES`).
    pub max_nodes: usize,
    /// Bytes of one variable's value, from the blueprint, `--var` or a trigger
    /// (`MAX_VARIABLE_BYTES`).
    pub max_variable_bytes: usize,
    /// Bytes of one blueprint document (a file, a Supabase row, the console's editor), as its
    /// text plus 16 for each JSON or TOML value in it, checked before it is parsed
    /// (`MAX_BLUEPRINT_BYTES`).
    pub max_blueprint_bytes: usize,
}

pub const DEFAULT_TEMPLATE_FUEL: u64 = 2_000_000;
pub const DEFAULT_TEMPLATE_MAX_OUTPUT: usize = 16 * 1024 * 1024;
pub const DEFAULT_TEMPLATE_MAX_VALUE: usize = 16 * 1024 * 1024;
pub const DEFAULT_MAX_ITEMS: usize = 10_000;
pub const DEFAULT_MAX_NODES: usize = 10_000;
pub const DEFAULT_MAX_VARIABLE_BYTES: usize = 16 * 1024 * 1024;
/// A hand-written automation is a few KiB; one with a long prompt library or a big list of
/// topics is well under 1 MiB. 16 MiB, counted like `MAX_VARIABLE_BYTES` (text plus 16 bytes
/// per value), leaves room for generated blueprints and embedded data about as large as one
/// variable may be, while parsing the largest document it lets through costs a few hundred
/// MB at most: the count caps a document at about a million values, and a parsed value takes
/// some 200 bytes, whereas 16 MiB of bare numbers without it would take well over 1 GB.
pub const DEFAULT_MAX_BLUEPRINT_BYTES: usize = 16 * 1024 * 1024;
/// What each value inside a document or a variable is charged beside its text: the least
/// one takes in memory once parsed (a `serde_json::Value` is 32 bytes, a list slot 16 more).
pub const BYTES_PER_VALUE: usize = 16;

/// The longest notification text: 16 Telegram messages. A longer one is a mistake (a whole
/// page pasted into a chat), and would be sent as hundreds of messages.
pub const MAX_NOTIFICATION_BYTES: usize = 64 * 1024;

/// The longest duration a blueprint may set (a timeout, a delay, a retry backoff): 30 days.
/// Longer is a typo, and near `u64::MAX` seconds it overflows the clock.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            template_fuel: DEFAULT_TEMPLATE_FUEL,
            template_max_output: DEFAULT_TEMPLATE_MAX_OUTPUT,
            template_max_value: DEFAULT_TEMPLATE_MAX_VALUE,
            max_items: DEFAULT_MAX_ITEMS,
            max_nodes: DEFAULT_MAX_NODES,
            max_variable_bytes: DEFAULT_MAX_VARIABLE_BYTES,
            max_blueprint_bytes: DEFAULT_MAX_BLUEPRINT_BYTES,
        }
    }
}

/// Seconds as a `Duration`, saturating: negative and NaN give zero, too large gives
/// `Duration::MAX` (`Duration::from_secs_f64` panics on those, and the seconds may come from
/// a provider's reply or a blueprint).
pub fn secs_f64(secs: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(std::time::Duration::MAX)
}

/// `d × factor`, saturating like [`secs_f64`].
pub fn scale(d: std::time::Duration, factor: f64) -> std::time::Duration {
    secs_f64(d.as_secs_f64() * factor)
}

/// `16777216` → `16 MiB`, `1500` → `1500 bytes`: sizes in messages.
pub fn human_bytes(n: usize) -> String {
    const MIB: usize = 1024 * 1024;
    const KIB: usize = 1024;
    if n >= MIB && n % MIB == 0 {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n % KIB == 0 {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// `61234567` → `61.2 MB`, `2048` → `2.0 kB`, `512` → `512 bytes`: a measured size in a
/// message, in the decimal units file managers and `ls -h --si` show.
pub fn human_size(n: u64) -> String {
    match n {
        0..=999 => format!("{n} bytes"),
        1_000..=999_999 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

/// The memory emergency, seen from a step: when the process's RSS is above
/// `MEMORY_THRESHOLD_MB`, the pool already holds new work (`engine/maintenance.rs`), but a
/// step already running can keep growing until the kernel kills the whole process with every
/// other run in it. The places where one step grows a buffer of its own (a template render's
/// values and output, an HTTP or model response body) report their size here as it grows;
/// once one of them holds more than a share of the threshold while the process is above it,
/// that step fails with [`memory::grown`]'s error instead.
pub mod memory {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// `MEMORY_THRESHOLD_MB` in bytes; 0 until an engine is built (nothing is checked).
    static THRESHOLD: AtomicU64 = AtomicU64::new(0);

    /// A step is told apart as the growing one once its buffer passes this fraction of the
    /// threshold: a quarter (125 MB at the default 500 MB) is far above what any budget lets
    /// a normal step hold (16 MiB outputs, 10 MiB bodies), and far below what takes the
    /// process down.
    pub const SHARE: u64 = 4;

    /// Sets the threshold the checks compare with (every engine of the process has the same).
    pub fn watch(threshold_mb: u64) {
        THRESHOLD.store(threshold_mb.saturating_mul(1 << 20), Ordering::Relaxed);
    }

    /// A step's buffer grew from `before` to `after` bytes: `Err` (the message for the step)
    /// when it is past the threshold's share and the process is above the threshold. Reads
    /// the RSS only when the buffer crosses another sixteenth of the threshold, so a
    /// growing buffer pays for a handful of reads, and a small one for none.
    pub fn grown(before: usize, after: usize) -> Result<(), String> {
        let threshold = THRESHOLD.load(Ordering::Relaxed);
        let share = threshold / SHARE;
        let (before, after) = (before as u64, after as u64);
        if threshold == 0 || after < share {
            return Ok(());
        }
        let step = (threshold / 16).max(1);
        if before >= share && before / step == after / step {
            return Ok(());
        }
        let Some(rss) = memory_stats::memory_stats().map(|m| m.physical_mem as u64) else {
            return Ok(());
        };
        if rss <= threshold {
            return Ok(());
        }
        Err(format!(
            "memory emergency: the process is above MEMORY_THRESHOLD_MB={} (RSS {} MB) and this \
             step alone has grown to {} MB, so it is failed to keep the process and its other \
             runs alive; make the step build or fetch less, or raise MEMORY_THRESHOLD_MB",
            threshold >> 20,
            rss >> 20,
            after >> 20
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_saturate_instead_of_panicking() {
        use std::time::Duration;
        assert_eq!(secs_f64(1e300), Duration::MAX);
        assert_eq!(secs_f64(f64::INFINITY), Duration::MAX);
        assert_eq!(secs_f64(f64::NAN), Duration::ZERO);
        assert_eq!(secs_f64(-3.0), Duration::ZERO);
        assert_eq!(secs_f64(1.5), Duration::from_millis(1500));
        assert_eq!(scale(Duration::MAX, 2.0), Duration::MAX);
        assert_eq!(scale(Duration::from_secs(10), 0.5), Duration::from_secs(5));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(16 * 1024 * 1024), "16 MiB");
        assert_eq!(human_bytes(2048), "2 KiB");
        assert_eq!(human_bytes(1500), "1500 bytes");
        assert_eq!(human_size(61_234_567), "61.2 MB");
        assert_eq!(human_size(2_048), "2.0 kB");
        assert_eq!(human_size(512), "512 bytes");
    }
}
