//! Shared test helpers: an engine on a real SQLite file in a temp dir, and a tiny HTTP
//! server that answers scripted replies.

#![allow(dead_code)]

pub mod bin;
pub mod counting;
pub mod http;
pub mod pgcut;

use omniflow::blueprint::Blueprint;
use omniflow::config::Config;
use omniflow::engine::{Engine, EngineOptions, RunOutcome, RunRequest};
use omniflow::events::EventBus;
use omniflow::pool::PoolOptions;
use omniflow::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub engine: Engine,
    pub bus: EventBus,
    pub store: Store,
}

/// An engine whose waits are scaled down 1000× (backoff, hints, latency), on a fresh database.
pub fn engine(extra: &[(&str, &str)], concurrency: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert(
        "DB_FILE".into(),
        dir.path().join("history.db").display().to_string(),
    );
    vars.insert(
        "LOG_DIR".into(),
        dir.path().join("logs").display().to_string(),
    );
    vars.insert("OMNIFLOW_TIME_SCALE".into(), "0.001".into());
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let config = Config::from_vars(&vars).unwrap();
    let store = Store::open(&config.db_file).unwrap();
    let bus = EventBus::new();
    let mut options = EngineOptions::from_config(&config);
    options.pool = PoolOptions {
        concurrency,
        ..PoolOptions::default()
    };
    let engine = Engine::with_options(Arc::new(config), store.clone(), bus.clone(), options);
    Env {
        dir,
        engine,
        bus,
        store,
    }
}

pub fn blueprint(json: serde_json::Value) -> Arc<Blueprint> {
    Arc::new(serde_json::from_value(json).expect("test blueprint deserializes"))
}

pub async fn run(env: &Env, bp: &Arc<Blueprint>, req: RunRequest) -> RunOutcome {
    env.engine.start(bp.clone(), req).unwrap().wait().await
}

pub fn sandbox(rate: f64, seed: u64) -> RunRequest {
    RunRequest {
        sandbox: true,
        simulate_failures: rate,
        seed: Some(seed),
        ..Default::default()
    }
}

/// One scripted HTTP reply.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
        }
    }
}

/// A local HTTP/1.1 server answering each request with the next scripted reply (the last
/// one repeats). Records the request lines and bodies it saw.
pub struct FakeServer {
    pub url: String,
    pub seen: Arc<Mutex<Vec<String>>>,
}

pub async fn fake_server(replies: Vec<Reply>) -> FakeServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let replies = Arc::new(Mutex::new(replies));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                break;
            };
            let replies = replies.clone();
            let seen = s.clone();
            tokio::spawn(async move {
                let Some(req) = http::read_request(&mut sock).await else {
                    return;
                };
                seen.lock().unwrap().push(format!(
                    "{} {} HTTP/1.1\n{}",
                    req.method, req.target, req.body
                ));
                let reply = {
                    let mut r = replies.lock().unwrap();
                    if r.len() > 1 {
                        r.remove(0)
                    } else {
                        r[0].clone()
                    }
                };
                http::write_reply(&mut sock, reply.status, &reply.headers, &reply.body).await;
            });
        }
    });
    FakeServer {
        url: format!("http://{addr}"),
        seen,
    }
}

pub fn short() -> Duration {
    Duration::from_millis(5)
}
