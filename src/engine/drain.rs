//! What a graceful shutdown waits for, without sleeping and looking again: each piece of
//! work it must let finish holds a [`Busy`], a clone of one channel's sender. The shutdown
//! drops the tracker's own sender and waits on the receiver, which reports the channel
//! closed exactly when the last clone is dropped, or gives up at the deadline.

use std::sync::Mutex;
use tokio::sync::mpsc;

/// Hands out [`Busy`] holds until [`Tracker::wait_until`] begins, then waits for them.
pub(crate) struct Tracker {
    /// `None` once the wait began: later work is not waited for.
    tx: Mutex<Option<mpsc::Sender<()>>>,
    /// Taken by the (first) wait.
    rx: Mutex<Option<mpsc::Receiver<()>>>,
}

/// Work a shutdown waits for, until this is dropped. Nothing is ever sent: only the drop
/// of the last clone matters.
pub(crate) struct Busy {
    _held: mpsc::Sender<()>,
}

impl Tracker {
    pub(crate) fn new() -> Tracker {
        let (tx, rx) = mpsc::channel(1);
        Tracker {
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
        }
    }

    /// A hold for work starting now; `None` once a shutdown is waiting (it waits for what was
    /// under way when it began, not for what starts later).
    pub(crate) fn hold(&self) -> Option<Busy> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref().map(|tx| Busy { _held: tx.clone() })
    }

    /// Stops handing out holds and waits until every hold is dropped, or until `deadline`
    /// (none: no limit). True when everything ended in time. A second wait returns at once.
    pub(crate) async fn wait_until(&self, deadline: Option<tokio::time::Instant>) -> bool {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut rx) = rx else {
            return true;
        };
        // `recv` answers `None` once every sender is gone (nothing is ever sent).
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, rx.recv()).await.is_ok(),
            None => {
                let _ = rx.recv().await;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;
    use std::time::Duration;

    #[tokio::test]
    async fn the_wait_ends_when_the_last_hold_is_dropped() {
        let t = Tracker::new();
        let (a, b) = (t.hold().unwrap(), t.hold().unwrap());
        let wait = t.wait_until(Some(
            tokio::time::Instant::now() + Duration::from_secs(3600),
        ));
        tokio::pin!(wait);
        assert!(futures_util::poll!(wait.as_mut()).is_pending());
        assert!(t.hold().is_none(), "no holds once the wait began");
        drop(a);
        assert!(
            futures_util::poll!(wait.as_mut()).is_pending(),
            "one is left"
        );
        // Ready at the drop itself: no poll interval, no deadline.
        drop(b);
        assert_eq!(futures_util::poll!(wait.as_mut()), Poll::Ready(true));
    }

    #[tokio::test]
    async fn the_wait_gives_up_at_the_deadline() {
        let t = Tracker::new();
        let _stuck = t.hold().unwrap();
        assert!(!t.wait_until(Some(tokio::time::Instant::now())).await);
        // A second wait has nothing left to wait for.
        assert!(t.wait_until(Some(tokio::time::Instant::now())).await);
    }
}
