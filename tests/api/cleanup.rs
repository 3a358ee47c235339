//! Removes what one test or bench made: its database and its Redis keys. Shared by the
//! integration tests and the benches (`benches/common` includes this file with
//! `#[path]`), so it depends on nothing of either: only dapi, sqlx, redis and tokio.

use std::time::Duration;

use dapi::config::Settings;
use dapi::staging::{Connector, Keyspace, Timeouts};

/// Drops the database of `settings.database_url` and deletes every key under
/// `settings.redis_prefix` on `settings.redis_url` when dropped. Make it before pointing
/// the settings at a proxy or an unreachable address: it cleans where they point.
#[derive(Debug)]
pub struct Cleanup {
    database_url: String,
    redis_url: String,
    cluster: bool,
    pattern: String,
}

/// Bound on the whole cleanup: a Redis that accepts and never answers must not hang the
/// test (or bench) that pointed at it.
const BOUND: Duration = Duration::from_secs(30);

impl Cleanup {
    pub fn new(settings: &Settings) -> Self {
        Self {
            database_url: settings.database_url.clone(),
            redis_url: settings.redis_url.clone(),
            cluster: settings.redis_cluster,
            pattern: Keyspace::new(&settings.redis_prefix).pattern(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // On a thread of its own: Drop cannot await, and the caller's runtime may be
        // shutting down.
        let (database_url, redis_url, cluster, pattern) = (
            self.database_url.clone(),
            self.redis_url.clone(),
            self.cluster,
            self.pattern.clone(),
        );
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(BOUND, remove(&database_url, &redis_url, cluster, &pattern)).await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn remove(database_url: &str, redis_url: &str, cluster: bool, pattern: &str) {
    use sqlx::migrate::MigrateDatabase;
    let _ = sqlx::Postgres::force_drop_database(database_url).await;
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        response: Duration::from_secs(5),
    };
    // On a cluster, KEYS asks every primary and DEL is split by slot (redis-rs routes both).
    let Ok(mut conn) = Connector::new(redis_url, cluster).and_then(|c| c.connect(timeouts)) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    // A bench can leave very many keys: delete them in bounded steps, not in one DEL
    // that blocks Redis for everyone else.
    for chunk in keys.chunks(10_000) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}
