//! Runs the real app on port 0 against the real PostgreSQL and Redis: each test gets
//! its own database (created, migrated, dropped) and its own Redis key prefix, so tests
//! run in parallel without seeing each other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dapi::app::{self, Roles, Running};
use dapi::config::Settings;
use dapi::domain::{CustomerId, Decision, DialogId, DialogState, Refusal, StagedMessage};
use dapi::flusher::{Flusher, Outcome};
use dapi::staging::{Connector, FlushQueue, Keyspace, RedisConn, SHARDS, Timeouts, unique_consumer_name};
use dapi::store::Store;
use reqwest::{Response, StatusCode};
use serde_json::Value;

use crate::cleanup::Cleanup;

/// The server the tests use; `DAPI_TEST_DATABASE_URL` points elsewhere (no database name).
pub fn postgres_base() -> String {
    std::env::var("DAPI_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn redis_url() -> String {
    std::env::var("DAPI_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `DAPI_TEST_REDIS_CLUSTER=true`: `DAPI_TEST_REDIS_URL` lists seeds of a Redis Cluster
/// (scripts/redis-cluster), and the suite runs against it.
pub fn redis_cluster() -> bool {
    std::env::var("DAPI_TEST_REDIS_CLUSTER").is_ok_and(|v| v == "true")
}

/// A connection of the test's own to the suite's Redis (or cluster): not through the
/// proxies or to the other servers some tests point dapi at.
pub fn redis_conn() -> RedisConn {
    Connector::new(&redis_url(), redis_cluster())
        .expect("redis url")
        .connect(Timeouts {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(10),
        })
        .expect("redis")
}

/// The connector `settings` name, for handles the test makes itself.
pub fn connector(settings: &Settings) -> Connector {
    Connector::new(&settings.redis_url, settings.redis_cluster).expect("redis url")
}

/// A name no other test of any run shares.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Settings for one test: its own database and key prefix, port 0.
pub fn test_settings() -> Settings {
    let mut settings = Settings::from_lookup(|_| None).expect("defaults are valid");
    settings.database_url = format!("{}/{}", postgres_base(), unique("dapi_test"));
    settings.redis_url = redis_url();
    settings.redis_cluster = redis_cluster();
    settings.redis_prefix = unique("dapitest");
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.flush_claim_idle = Duration::from_millis(500);
    settings
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub store: Store,
    pub settings: Settings,
    pub keys: Keyspace,
    pub redis: RedisConn,
    running: Option<Running>,
    // Last field: dropped after the app is told to stop.
    _cleanup: Cleanup,
}

/// The app with the HTTP API and flushers.
pub async fn spawn_app() -> TestApp {
    spawn_full(test_settings()).await
}

/// The app with the HTTP API and flushers, from `settings`.
pub async fn spawn_full(settings: Settings) -> TestApp {
    spawn_app_with(
        settings,
        Roles {
            http: true,
            flusher: true,
        },
    )
    .await
}

/// The app with the HTTP API and no flusher: the test drives every flush itself, or
/// leaves it to flusher processes of its own.
pub async fn spawn_api_only(settings: Settings) -> TestApp {
    spawn_app_with(
        settings,
        Roles {
            http: true,
            flusher: false,
        },
    )
    .await
}

pub async fn spawn_app_with(settings: Settings, roles: Roles) -> TestApp {
    // Captured per test by the harness (shown for failing tests only).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DAPI_LOG").unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
    let cleanup = Cleanup::new(&settings);
    let running = app::start(settings.clone(), roles).await.expect("the app starts");
    let addr = running.local_addr;
    let store = Store::connect(&settings.database_url).await.expect("store");
    let redis = redis_conn();
    TestApp {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        store,
        keys: Keyspace::new(&settings.redis_prefix).for_cluster(settings.redis_cluster),
        settings,
        redis,
        running: Some(running),
        _cleanup: cleanup,
    }
}

impl TestApp {
    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post_raw(path, Some("application/json"), body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(&self, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Response {
        let mut request = self.http.post(format!("{}{path}", self.base)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request.send().await.expect("request sent")
    }

    /// POST /data/{c}/{d} with a valid message; returns its seq.
    pub async fn stage(&self, customer: i64, dialog: i64, text: &str, language: &str) -> i64 {
        let response = self
            .post_json(
                &format!("/data/{customer}/{dialog}"),
                &serde_json::json!({"text": text, "language": language}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.expect("json");
        body["seq"].as_i64().expect("seq")
    }

    pub async fn consent(&self, dialog: i64, approved: bool) -> Response {
        self.post_json(
            &format!("/consents/{dialog}"),
            &serde_json::json!({ "approved": approved }),
        )
        .await
    }

    pub async fn get(&self, path_and_query: &str) -> Response {
        self.http
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get_json(&self, path_and_query: &str) -> Value {
        let response = self.get(path_and_query).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path_and_query}");
        response.json().await.expect("json")
    }

    /// Seqs of a dialog stored in PostgreSQL, ascending.
    pub async fn stored_seqs(&self, dialog: i64) -> Vec<i64> {
        sqlx::query_scalar("SELECT seq FROM messages WHERE dialog_id = $1 ORDER BY seq")
            .bind(dialog)
            .fetch_all(self.store.pool())
            .await
            .expect("query")
    }

    /// Redis forgets the dialog (a restart without persistence, a failover, an expiry).
    pub async fn forget(&self, dialog: i64) {
        self.delete(&[self.keys.meta(dialog), self.keys.msgs(dialog)]).await;
    }

    /// Redis loses everything of `dialog`, its messageIds too (a restart without
    /// persistence, a failover to a replica that never had it).
    pub async fn lose(&self, dialog: i64) {
        let keys = [self.keys.meta(dialog), self.keys.msgs(dialog), self.keys.ids(dialog)];
        self.delete(&keys).await;
    }

    async fn delete(&self, keys: &[String]) {
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.expect("del");
    }

    /// `dialog` as after `DAPI_STAGING_TTL` without a message: Redis has forgotten its
    /// keys, and a refusal PostgreSQL holds of it is older than the TTL (it refuses no
    /// more: docs/api.md's "for as long as the dialog is remembered").
    pub async fn expire(&self, dialog: i64) {
        self.forget(dialog).await;
        sqlx::query("UPDATE dialogs SET decided_at = decided_at - make_interval(secs => $2) WHERE dialog_id = $1")
            .bind(dialog)
            .bind(self.settings.staging_ttl.as_secs_f64() + 1.0)
            .execute(self.store.pool())
            .await
            .expect("age the decision");
    }

    /// How many messages of `dialog` are staged in Redis (the length of its list).
    pub async fn staged_len(&self, dialog: i64) -> usize {
        let mut conn = self.redis.clone();
        redis::cmd("LLEN")
            .arg(self.keys.msgs(dialog))
            .query_async(&mut conn)
            .await
            .expect("llen")
    }

    /// Waits (bounded) until `dialog` has exactly `seqs` stored.
    pub async fn wait_for_seqs(&self, dialog: i64, seqs: &[i64]) {
        wait_until(Duration::from_secs(15), async || {
            let stored = self.stored_seqs(dialog).await;
            (stored == seqs)
                .then_some(())
                .ok_or_else(|| format!("dialog {dialog}: stored {stored:?}, expected {seqs:?}"))
        })
        .await;
    }

    /// Waits (bounded) until the flush queue is empty: every entry acknowledged.
    pub async fn wait_for_empty_queue(&self) {
        wait_until(Duration::from_secs(20), async || {
            let len = self.queue_len().await;
            (len == 0)
                .then_some(())
                .ok_or_else(|| format!("the flush queue still holds {len} entries"))
        })
        .await;
    }

    /// Every shard's quarantine index, together: dialog id → `<unix seconds> <reason>`.
    pub async fn quarantine_index(&self) -> std::collections::HashMap<String, String> {
        let mut conn = self.redis.clone();
        let mut all = std::collections::HashMap::new();
        for shard in 0..SHARDS {
            let index: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.keys.quarantine_index(shard))
                .query_async(&mut conn)
                .await
                .expect("hgetall");
            all.extend(index);
        }
        all
    }

    /// Entries in every shard's flush stream.
    pub async fn queue_len(&self) -> usize {
        let mut conn = self.redis.clone();
        let mut len = 0;
        for shard in 0..SHARDS {
            let n: usize = redis::cmd("XLEN")
                .arg(self.keys.flush_stream(shard))
                .query_async(&mut conn)
                .await
                .expect("xlen");
            len += n;
        }
        len
    }

    /// Stops the app gracefully; true when everything finished within the timeout.
    pub async fn stop(&mut self) -> bool {
        match self.running.take() {
            Some(running) => running.stop().await,
            None => true,
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown_token().cancel();
        }
    }
}

/// Polls `check` (every 20 ms of real time) until it answers `Ok`, and returns that;
/// panics with its last `Err`, which says what it saw, once `bound` has passed.
pub async fn wait_until<T>(bound: Duration, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        match check().await {
            Ok(done) => return done,
            Err(seen) if Instant::now() >= deadline => panic!("not within {bound:?}: {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The value of `series` (a name, with its labels as exposed, e.g.
/// `dapi_store_errors_total{store="postgres"}`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Asserts that `response` is a problem+json answer with `status` and `code`.
pub async fn assert_problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["type"], "about:blank");
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    body
}

// The flusher driven by hand, and what a test reads of the stores meanwhile.

/// A flusher the test drives itself, round by round (`flush_once`) or through its seams
/// (`next_batch`, `store_batch`, `finish_batch`). It takes over another consumer's
/// entries only after a minute of idleness: never within a test.
pub fn flusher(app: &TestApp) -> Flusher {
    let queue = FlushQueue::new(
        &connector(&app.settings),
        app.keys.clone(),
        unique_consumer_name("test"),
        Duration::from_secs(60),
        Duration::from_millis(50),
        app.settings.staging_ttl,
    )
    .unwrap();
    Flusher::new(queue, app.store.clone(), 64)
}

/// Runs rounds until one finds nothing to do.
pub async fn drain(flusher: &mut Flusher) {
    for _ in 0..50 {
        if flusher.flush_once().await.unwrap() == Outcome::Idle {
            return;
        }
    }
    panic!("the queue never drained");
}

/// One field of `dialog`'s meta hash in Redis (its letters: `staging`'s module doc).
pub async fn meta_field(app: &TestApp, dialog: i64, field: &str) -> Option<String> {
    let mut conn = app.redis.clone();
    redis::cmd("HGET")
        .arg(app.keys.meta(dialog))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Milliseconds until `key` expires (Redis `PTTL`: -1 never, -2 no such key).
pub async fn pttl(app: &TestApp, key: &str) -> i64 {
    let mut conn = app.redis.clone();
    redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap()
}

/// The texts PostgreSQL holds of `dialog`, by seq.
pub async fn stored_texts(app: &TestApp, dialog: i64) -> Vec<String> {
    sqlx::query_scalar("SELECT text FROM messages WHERE dialog_id = $1 ORDER BY seq")
        .bind(dialog)
        .fetch_all(app.store.pool())
        .await
        .unwrap()
}

/// POST `body` to `path` on the dapi at `base` (such as one whose PostgreSQL is away).
pub async fn post_to(app: &TestApp, base: &str, path: &str, body: Value) -> Response {
    app.http.post(format!("{base}{path}")).json(&body).send().await.unwrap()
}

/// A refusal of `dialog` (of `customer`) at `epoch`, as the flusher writes one whose
/// erasure has not reached PostgreSQL yet.
pub fn refusal_of(dialog: i64, customer: i64, epoch: i64) -> DialogState {
    DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(dialog),
        customer: CustomerId::from_stored(customer),
        decision: Decision::Refused,
        epoch,
        decided_at_us: 0,
        unerased_refusal: Some(Refusal {
            epoch,
            decided_at_us: 0,
        }),
        messages: Vec::new(),
    }
}

/// Granted dialog states with chosen timestamps, as the flusher would write them:
/// `(customer, dialog, seq, language, received_at_us)`; each text is
/// `c<customer> d<dialog> s<seq>` followed by `pad`.
pub fn states_of(rows: &[(i64, i64, i64, &str, i64)], pad: &str) -> Vec<DialogState> {
    let mut states: Vec<DialogState> = Vec::new();
    for &(customer, dialog, seq, language, at) in rows {
        let message = StagedMessage {
            seq,
            received_at_us: at,
            language: language.to_owned(),
            text: format!("c{customer} d{dialog} s{seq}{pad}"),
            message_id: None,
        };
        match states.iter_mut().find(|s| s.dialog.get() == dialog) {
            Some(state) => state.messages.push(message),
            None => states.push(DialogState {
                audit: Default::default(),
                dialog: DialogId::from_stored(dialog),
                customer: CustomerId::from_stored(customer),
                decision: Decision::Granted,
                epoch: 1,
                decided_at_us: 0,
                unerased_refusal: None,
                messages: vec![message],
            }),
        }
    }
    states
}

/// Asserts that the fine counters (`message_counts_fine`) hold, for every filter form,
/// day and ten-minute slot, exactly what counting the rows gives.
pub async fn assert_fine_counts_exact(store: &Store) {
    let wrong: Vec<String> = sqlx::query_scalar(
        "WITH rows AS (
             SELECT coalesce(customer_id, -1) AS customer_id, coalesce(language, '') AS language, span, bucket,
                    count(*)::int8 AS n
             FROM (SELECT customer_id, lower(language) AS language, s.span, messages_bucket(received_at, s.span) AS bucket
                   FROM messages, (VALUES (600), (86400)) s (span)) m
             GROUP BY span, bucket, GROUPING SETS ((customer_id, language), (customer_id), (language), ())
         ), kept AS (
             SELECT customer_id, language, span, bucket, sum(n)::int8 AS n FROM message_counts_fine
             GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0
         )
         SELECT format('customer %s, language %L, span %s, bucket %s: kept %s, rows %s',
                       customer_id, language, span, bucket, k.n, r.n)
         FROM rows r FULL JOIN kept k USING (customer_id, language, span, bucket)
         WHERE k.n IS DISTINCT FROM r.n",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(wrong.is_empty(), "fine counters unlike the rows: {wrong:#?}");
}
