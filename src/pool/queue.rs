//! Four FIFO queues with aging. Only the front of each level can be the next job (it is the
//! oldest there, so it has aged the most), which keeps `pop` O(1).

use crate::blueprint::Priority;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub(crate) struct Queued<T> {
    /// Arrival order across all levels; ties between levels go to the older job.
    pub seq: u64,
    pub at: Instant,
    pub item: T,
}

pub(crate) struct PriorityQueue<T> {
    levels: [VecDeque<Queued<T>>; 4],
    next_seq: u64,
}

impl<T> PriorityQueue<T> {
    pub fn new() -> Self {
        PriorityQueue {
            levels: Default::default(),
            next_seq: 0,
        }
    }

    pub fn push(&mut self, level: Priority, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.levels[level.index()].push_back(Queued {
            seq,
            at: Instant::now(),
            item,
        });
    }

    /// Depth per level, indexed by [`Priority::index`].
    pub fn depths(&self) -> [usize; 4] {
        [
            self.levels[0].len(),
            self.levels[1].len(),
            self.levels[2].len(),
            self.levels[3].len(),
        ]
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.levels.iter().map(VecDeque::len).sum()
    }

    /// The job to run next: the highest *effective* level, where a job climbs one level per
    /// `aging` of waiting (`Duration::ZERO` turns aging off); among equals, the oldest.
    pub fn pop(&mut self, now: Instant, aging: Duration) -> Option<Queued<T>> {
        let mut best: Option<(usize, usize, u64)> = None; // (effective, level, seq)
        for level in 0..4 {
            if let Some(front) = self.levels[level].front() {
                let climbed = if aging.is_zero() {
                    0
                } else {
                    (now.saturating_duration_since(front.at).as_nanos() / aging.as_nanos().max(1))
                        .min(3) as usize
                };
                let eff = (level + climbed).min(3);
                let better = match best {
                    None => true,
                    Some((be, _, bseq)) => eff > be || (eff == be && front.seq < bseq),
                };
                if better {
                    best = Some((eff, level, front.seq));
                }
            }
        }
        let (_, level, _) = best?;
        self.levels[level].pop_front()
    }

    /// Moves every item for which `f` names a new level there, keeping arrival order.
    pub fn retarget(&mut self, mut f: impl FnMut(&mut T) -> Option<Priority>) -> usize {
        let mut moved = Vec::new();
        for level in self.levels.iter_mut() {
            let mut keep = VecDeque::with_capacity(level.len());
            for mut q in level.drain(..) {
                match f(&mut q.item) {
                    Some(to) => moved.push((to, q)),
                    None => keep.push_back(q),
                }
            }
            *level = keep;
        }
        let n = moved.len();
        for (to, q) in moved {
            let dest = &mut self.levels[to.index()];
            let pos = dest.partition_point(|x| x.seq < q.seq);
            dest.insert(pos, q);
        }
        n
    }

    /// Removes and returns every item matching `pred`.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for level in self.levels.iter_mut() {
            let mut keep = VecDeque::with_capacity(level.len());
            for q in level.drain(..) {
                if pred(&q.item) {
                    out.push(q.item);
                } else {
                    keep.push_back(q);
                }
            }
            *level = keep;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut PriorityQueue<&'static str>, aging: Duration) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Some(x) = q.pop(Instant::now(), aging) {
            out.push(x.item);
        }
        out
    }

    #[test]
    fn higher_levels_first_fifo_within_a_level() {
        let mut q = PriorityQueue::new();
        q.push(Priority::Low, "low1");
        q.push(Priority::Normal, "normal1");
        q.push(Priority::Critical, "crit1");
        q.push(Priority::High, "high1");
        q.push(Priority::Normal, "normal2");
        q.push(Priority::Critical, "crit2");
        assert_eq!(q.depths(), [1, 2, 1, 2]);
        assert_eq!(
            drain(&mut q, Duration::ZERO),
            ["crit1", "crit2", "high1", "normal1", "normal2", "low1"]
        );
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn an_old_low_job_beats_new_critical_ones() {
        let mut q = PriorityQueue::new();
        q.push(Priority::Low, "old-low");
        std::thread::sleep(Duration::from_millis(40));
        q.push(Priority::Critical, "crit1");
        q.push(Priority::Critical, "crit2");
        // 40 ms waited with a 10 ms step: the low job has climbed to critical and is older.
        assert_eq!(
            drain(&mut q, Duration::from_millis(10)),
            ["old-low", "crit1", "crit2"]
        );
    }

    #[test]
    fn retarget_keeps_arrival_order() {
        let mut q = PriorityQueue::new();
        q.push(Priority::Low, "a1");
        q.push(Priority::High, "b1");
        q.push(Priority::Low, "a2");
        q.push(Priority::High, "b2");
        let moved = q.retarget(|x| x.starts_with('a').then_some(Priority::High));
        assert_eq!(moved, 2);
        assert_eq!(drain(&mut q, Duration::ZERO), ["a1", "b1", "a2", "b2"]);
    }

    #[test]
    fn remove_where_takes_only_matches() {
        let mut q = PriorityQueue::new();
        q.push(Priority::Low, "a1");
        q.push(Priority::High, "b1");
        q.push(Priority::Normal, "a2");
        let gone = q.remove_where(|x| x.starts_with('a'));
        assert_eq!(gone, ["a1", "a2"]);
        assert_eq!(drain(&mut q, Duration::ZERO), ["b1"]);
    }
}
