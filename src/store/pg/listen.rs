//! Wake-ups: one dedicated connection per process `LISTEN`ing on the queue's channels, on a
//! plain thread (the blocking client runs its own runtime), reconnecting when it drops.

use super::connect::{describe, PgTarget};
use postgres::fallible_iterator::FallibleIterator;
use std::time::Duration;

/// One notification received on a [`listen`] connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub channel: String,
    pub payload: String,
}

/// What [`listen`] tells its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    Notice(Notice),
    /// The connection was (re)established: notifications may have been missed meanwhile, so
    /// look at the queue once.
    Connected,
    /// The connection dropped; the error, then a reconnect after a pause.
    Lost(String),
}

/// Listens on `channels` over one dedicated connection until `stop` says so, calling `heard`
/// for each notification; reconnects (after `retry`) whenever the connection drops. Blocking:
/// run it on its own thread. `stop` is checked at least every `tick`.
pub fn listen(
    target: &PgTarget,
    channels: &[&str],
    tick: Duration,
    retry: Duration,
    stop: &dyn Fn() -> bool,
    heard: &mut dyn FnMut(Heard),
) {
    let fixed: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    listen_growing(target, &|| fixed.clone(), tick, retry, stop, heard)
}

/// Like [`listen`], with channels that may be added while it listens (`channels` is read at
/// every `tick`): one connection for every subscriber of the process. A channel added while
/// connected is told as [`Heard::Connected`] once it is listened to.
pub fn listen_growing(
    target: &PgTarget,
    channels: &dyn Fn() -> Vec<String>,
    tick: Duration,
    retry: Duration,
    stop: &dyn Fn() -> bool,
    heard: &mut dyn FnMut(Heard),
) {
    let sql = |cs: &[String]| -> String {
        cs.iter()
            .map(|c| format!("LISTEN {c};"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    while !stop() {
        let mut listening = channels();
        let mut client = match target.connect() {
            Ok(c) => c,
            Err(e) => {
                heard(Heard::Lost(e));
                pause(retry, tick, stop);
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&sql(&listening)) {
            heard(Heard::Lost(describe(&e, target, "listen for new steps")));
            pause(retry, tick, stop);
            continue;
        }
        heard(Heard::Connected);
        let lost = loop {
            if stop() {
                return;
            }
            let next = client.notifications().timeout_iter(tick).next();
            match next {
                Ok(Some(n)) => heard(Heard::Notice(Notice {
                    channel: n.channel().to_string(),
                    payload: n.payload().to_string(),
                })),
                Ok(None) => {
                    // A quiet tick: a closed connection reads as quiet too, so look.
                    if client.is_closed() {
                        break "the connection closed".to_string();
                    }
                }
                Err(e) => break describe(&e, target, "listen for new steps"),
            }
            let new: Vec<String> = channels()
                .into_iter()
                .filter(|c| !listening.contains(c))
                .collect();
            if !new.is_empty() {
                if let Err(e) = client.batch_execute(&sql(&new)) {
                    break describe(&e, target, "listen for new steps");
                }
                listening.extend(new);
                heard(Heard::Connected);
            }
        };
        heard(Heard::Lost(lost));
        pause(retry, tick, stop);
    }
}

fn pause(total: Duration, tick: Duration, stop: &dyn Fn() -> bool) {
    let until = std::time::Instant::now() + total;
    while !stop() && std::time::Instant::now() < until {
        std::thread::sleep(tick.min(total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// The wait before listening again holds until its time is up or the listener is told to
    /// stop, looking at the stop flag every tick: a database that is down is not reconnected to
    /// in a tight loop, and a stopping process is not held for the whole wait.
    #[test]
    fn the_wait_before_listening_again_ends_when_told_to_stop() {
        let looks = Cell::new(0);
        let stop = || {
            looks.set(looks.get() + 1);
            looks.get() >= 3
        };
        pause(Duration::from_secs(3600), Duration::from_millis(1), &stop);
        assert_eq!(looks.get(), 3, "it waited a tick between looks until told");
    }
}
