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
        let connector = dapi::staging::Connector::new(&settings.redis_url, settings.redis_cluster).unwrap();
        let staging = Staging::new(connector, &settings.redis_prefix, settings.staging_ttl).unwrap();
        Sandbox {
            settings,
            store,
            staging,
            _cleanup: cleanup,
        }
    }

    pub fn state(&self) -> AppState {
        AppState::new(
            self.staging.clone(),
            self.store.clone(),
            Arc::new(self.settings.clone()),
        )
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

/// Sends `total` POSTs from `concurrency` keep-alive connections; `request(i)` gives the
/// i-th request's path and body, and every answer must have status `expect`. Returns the
/// wall time; prints the run's p50 and p99 (criterion reports throughput, not tails).
pub async fn post_load(
    base: String,
    concurrency: usize,
    total: u64,
    expect: u16,
    request: impl Fn(u64) -> (String, Vec<u8>) + Send + Sync + 'static,
) -> Duration {
    let request = Arc::new(request);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency as u64 {
        let (base, request) = (base.clone(), request.clone());
        let client = reqwest::Client::new();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut i = worker;
            while i < total {
                let (path, body) = request(i);
                let sent = Instant::now();
                let response = client
                    .post(format!("{base}{path}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), expect);
                response.bytes().await.unwrap();
                latencies.push(sent.elapsed());
                i += concurrency as u64;
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    while let Some(worker) = tasks.join_next().await {
        latencies.extend(worker.unwrap());
    }
    let wall = started.elapsed();
    latencies.sort_unstable();
    if !latencies.is_empty() {
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        eprintln!(
            "    {total} requests in {wall:.2?}: p50 {:.2?}, p99 {:.2?}",
            at(0.50),
            at(0.99)
        );
    }
    wall
}
