//! Run ids: short, time-sortable, typed by humans (`omniflow show mhx3k2a1q7f3`, or a unique
//! prefix of it).

use std::time::{SystemTime, UNIX_EPOCH};

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A new run id: 9 base-36 characters of milliseconds since 1970 (sorts by time until the
/// year 5188) and 4 random ones.
pub fn run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut s = base36(ms, 9);
    s.push_str(&base36(rand::random::<u64>() % 36u64.pow(4), 4));
    s
}

fn base36(mut n: u64, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_short_unique_and_sort_by_time() {
        let a = super::run_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::run_id();
        assert_eq!(a.len(), 13);
        assert_ne!(a, b);
        assert!(a[..9] < b[..9]);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
