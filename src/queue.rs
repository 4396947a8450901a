//! The original's task queue as a library API, for programs that embed OmniFlow: `add_task`,
//! `add_batch`, `wait_for_tasks`, `stats`, `retry_failed_tasks`, and a subscription to
//! task-completed events. Tasks run on the same priority [`Pool`] as blueprints' steps.
//!
//! ```no_run
//! # async fn demo(pool: omniflow::pool::Pool) {
//! use omniflow::blueprint::Priority;
//! use omniflow::queue::TaskQueue;
//! let queue = TaskQueue::new(pool);
//! queue.add_task("hello", Priority::High, || async { Ok(serde_json::json!("hi")) });
//! let results = queue.wait_for_tasks().await;
//! assert!(results.iter().all(|r| r.result.is_ok()));
//! # }
//! ```

use crate::blueprint::Priority;
use crate::error::StepError;
use crate::events::PoolStats;
use crate::pool::{JobMeta, Pool};
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// A task's work: called again by `retry_failed_tasks`, so it is a factory of futures.
type Work = Arc<dyn Fn() -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// Identifies a task in this queue.
pub type TaskId = u64;

/// The end of one task (each try of it).
#[derive(Debug, Clone, Serialize)]
pub struct TaskCompleted {
    pub id: TaskId,
    pub name: String,
    /// How many times it has run (a retried task counts each run).
    pub runs: u32,
    pub result: Result<Value, String>,
}

/// Counts of the queue's tasks, and the pool they share.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    pub pending: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub pool: PoolStats,
}

struct Task {
    name: String,
    priority: Priority,
    work: Work,
    runs: u32,
    last: Option<Result<Value, String>>,
}

struct State {
    next_id: TaskId,
    tasks: BTreeMap<TaskId, Task>,
}

/// A queue of tasks on a [`Pool`]; cheap to clone.
#[derive(Clone)]
pub struct TaskQueue {
    pool: Pool,
    state: Arc<Mutex<State>>,
    /// Tasks submitted and not yet finished.
    pending: Arc<watch::Sender<usize>>,
    completed: broadcast::Sender<TaskCompleted>,
}

impl TaskQueue {
    pub fn new(pool: Pool) -> TaskQueue {
        let (completed, _) = broadcast::channel(1024);
        TaskQueue {
            pool,
            state: Arc::new(Mutex::new(State {
                next_id: 1,
                tasks: BTreeMap::new(),
            })),
            pending: Arc::new(watch::channel(0).0),
            completed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a task at `priority`; returns its id.
    pub fn add_task<F, Fut>(&self, name: &str, priority: Priority, work: F) -> TaskId
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        let work: Work = Arc::new(move || Box::pin(work()));
        let id = {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            st.tasks.insert(
                id,
                Task {
                    name: name.to_string(),
                    priority,
                    work,
                    runs: 0,
                    last: None,
                },
            );
            id
        };
        self.submit(id);
        id
    }

    /// Queues several tasks at once (in order, so within a priority they run first-in first-out).
    pub fn add_batch<F, Fut>(
        &self,
        tasks: impl IntoIterator<Item = (String, Priority, F)>,
    ) -> Vec<TaskId>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        tasks
            .into_iter()
            .map(|(name, p, f)| self.add_task(&name, p, f))
            .collect()
    }

    fn submit(&self, id: TaskId) {
        let Some((name, priority, work)) = self
            .lock()
            .tasks
            .get(&id)
            .map(|t| (t.name.clone(), t.priority, t.work.clone()))
        else {
            return;
        };
        self.pending.send_modify(|n| *n += 1);
        let fut = self.pool.submit(
            JobMeta {
                run_id: "queue".into(),
                step: format!("{name}#{id}").into(),
                attempt: 1,
                priority,
            },
            CancellationToken::new(),
            work(),
        );
        let this = self.clone();
        tokio::spawn(async move {
            let result = match fut.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let done = {
                let mut st = this.lock();
                st.tasks.get_mut(&id).map(|t| {
                    t.runs += 1;
                    t.last = Some(result.clone());
                    TaskCompleted {
                        id,
                        name: t.name.clone(),
                        runs: t.runs,
                        result,
                    }
                })
            };
            if let Some(done) = done {
                // Nobody subscribed, or a subscriber lagging: never a reason to wait.
                let _ = this.completed.send(done);
            }
            this.pending.send_modify(|n| *n = n.saturating_sub(1));
        });
    }

    /// Waits until no task is pending; returns every task's latest result, by id.
    pub async fn wait_for_tasks(&self) -> Vec<TaskCompleted> {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        self.lock()
            .tasks
            .iter()
            .filter_map(|(id, t)| {
                t.last.clone().map(|result| TaskCompleted {
                    id: *id,
                    name: t.name.clone(),
                    runs: t.runs,
                    result,
                })
            })
            .collect()
    }

    /// Runs every task whose latest run failed again; returns how many.
    pub fn retry_failed_tasks(&self) -> usize {
        let failed: Vec<TaskId> = self
            .lock()
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.last, Some(Err(_))))
            .map(|(id, _)| *id)
            .collect();
        for id in &failed {
            self.submit(*id);
        }
        failed.len()
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.lock();
        let succeeded = st
            .tasks
            .values()
            .filter(|t| matches!(t.last, Some(Ok(_))))
            .count();
        let failed = st
            .tasks
            .values()
            .filter(|t| matches!(t.last, Some(Err(_))))
            .count();
        QueueStats {
            pending: *self.pending.borrow(),
            succeeded,
            failed,
            pool: self.pool.stats(),
        }
    }

    /// Every task completion from now on (a receiver that falls behind skips, never blocks).
    pub fn subscribe(&self) -> broadcast::Receiver<TaskCompleted> {
        self.completed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::events::EventBus;
    use crate::pool::PoolOptions;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn tasks_run_fail_and_are_retried() {
        let pool = Pool::new(
            PoolOptions {
                concurrency: 4,
                ..PoolOptions::default()
            },
            EventBus::new(),
        );
        let q = TaskQueue::new(pool);
        let mut done = q.subscribe();
        let flaky_runs = Arc::new(AtomicU32::new(0));
        let f = flaky_runs.clone();
        q.add_task("flaky", Priority::High, move || {
            let n = f.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(StepError::new(ErrorKind::Server, "first run fails"))
                } else {
                    Ok(Value::from("ok now"))
                }
            }
        });
        let ids = q.add_batch((0..10).map(|i| {
            (format!("t{i}"), Priority::Normal, move || async move {
                Ok(Value::from(i))
            })
        }));
        assert_eq!(ids.len(), 10);
        let results = q.wait_for_tasks().await;
        assert_eq!(results.len(), 11);
        assert_eq!(q.stats().failed, 1);
        assert_eq!(q.stats().succeeded, 10);
        // Every task's completion reached the subscriber once, with its own result.
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..11 {
            let c = done.recv().await.unwrap();
            assert_eq!(c.runs, 1, "{}", c.name);
            assert!(seen.insert(c.name.clone(), c.result).is_none());
        }
        let flaky = seen["flaky"].clone().unwrap_err();
        assert!(flaky.contains("first run fails"), "{flaky}");
        for i in 0..10 {
            assert_eq!(seen[&format!("t{i}")], Ok(Value::from(i)));
        }

        assert_eq!(q.retry_failed_tasks(), 1);
        let results = q.wait_for_tasks().await;
        let flaky = results.iter().find(|r| r.name == "flaky").unwrap();
        assert_eq!(flaky.runs, 2);
        assert_eq!(flaky.result, Ok(Value::from("ok now")));
        assert_eq!(q.stats().failed, 0);
        assert_eq!(q.stats().pending, 0);
    }
}
