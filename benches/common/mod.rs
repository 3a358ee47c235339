//! What every bench needs: a runtime, a database and key prefix of its own (dropped
//! afterwards), the app served in-process, and a concurrent HTTP load loop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dapi::config::Settings;
use dapi::http::{AppState, router};
use dapi::staging::{Keyspace, Staging};
use dapi::store::Store;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

// The tests' cleanup, shared as a file: tests and benches are separate crates, and a
// crate of its own for one struct would be more machinery than this.
#[path = "../../tests/api/cleanup.rs"]
mod cleanup;
use cleanup::Cleanup;

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A bench's own database and Redis prefix; both removed when dropped.
pub struct Sandbox {
    pub settings: Settings,
    pub store: Store,
    pub staging: Staging,
    // Last field: dropped after the store's pool.
    _cleanup: Cleanup,
}

impl Sandbox {
    pub async fn new(tag: &str) -> Sandbox {
        let mut settings = Settings::from_lookup(|_| None).unwrap();
        let base =
            std::env::var("DAPI_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        settings.database_url = format!("{base}/dapi_bench_{tag}_{}", std::process::id());
        settings.redis_url = std::env::var("DAPI_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        settings.redis_prefix = format!("dapibench_{tag}_{}", std::process::id());
        // A bench measures throughput, not the in-flight bound.
        settings.max_in_flight = 1 << 20;
        let cleanup = Cleanup::new(&settings);
        let store = Store::connect(&settings.database_url).await.unwrap();
        store.migrate().await.unwrap();
        let client = redis::Client::open(settings.redis_url.as_str()).unwrap();
        let staging = Staging::new(client, &settings.redis_prefix, settings.staging_ttl).unwrap();
        Sandbox {
            settings,
            store,
            staging,
            _cleanup: cleanup,
        }
    }

    pub fn state(&self) -> AppState {
        AppState {
            staging: self.staging.clone(),
            store: self.store.clone(),
            settings: Arc::new(self.settings.clone()),
        }
    }

    /// Serves `app` on a free port; returns its base URL.
    pub async fn serve(&self, app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(dapi::app::serve(
            listener,
            app,
            CancellationToken::new(),
            Duration::from_secs(10),
        ));
        base
    }

    pub async fn serve_api(&self) -> String {
        self.serve(router(self.state())).await
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.settings.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn keys(&self) -> Keyspace {
        Keyspace::new(&self.settings.redis_prefix)
    }
}

/// Sends `total` POSTs from `concurrency` keep-alive connections; `path(i)` names the
/// i-th request's path. Returns the wall time.
pub async fn post_load(
    base: String,
    concurrency: usize,
    total: u64,
    path: impl Fn(u64) -> String + Send + Sync + 'static,
) -> Duration {
    let path = Arc::new(path);
    let body: &'static [u8] = br#"{"text": "Hello, World", "language": "EN"}"#;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency as u64 {
        let (base, path) = (base.clone(), path.clone());
        let client = reqwest::Client::new();
        tasks.spawn(async move {
            let mut i = worker;
            while i < total {
                let response = client
                    .post(format!("{base}{}", path(i)))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 202);
                i += concurrency as u64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}
