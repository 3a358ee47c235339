//! `DAPI_REDIS_WAIT_REPLICAS`: a write is acknowledged only once Redis replicas hold it,
//! against the local primary and replica of `scripts/redis-replica` (127.0.0.1:6390 and
//! :6391; `scripts/test` starts them). The replica is stopped (SIGSTOP) to make it miss
//! its confirmations, so these tests run one at a time (`.config/nextest.toml`, group
//! `redis-replica`).

use std::time::{Duration, Instant};

use dapi::staging::Keyspace;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_api_only, test_settings, wait_until};

const PRIMARY: &str = "redis://127.0.0.1:6390";
const REPLICA: &str = "redis://127.0.0.1:6391";

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{url} answers (run scripts/redis-replica start): {e}"))
}

async fn spawn(wait_replicas: usize) -> TestApp {
    let mut settings = test_settings();
    settings.redis_url = PRIMARY.into();
    settings.redis_wait_replicas = wait_replicas;
    spawn_api_only(settings).await
}

async fn replica_len(keys: &Keyspace, dialog: i64) -> usize {
    redis::cmd("LLEN")
        .arg(keys.msgs(dialog))
        .query_async(&mut redis(REPLICA).await)
        .await
        .unwrap()
}

/// The replica's process stopped (SIGSTOP) while this lives: it neither applies nor
/// confirms writes. Resumed (SIGCONT) when dropped, whatever the test did.
struct Stopped(String);

impl Stopped {
    async fn replica() -> Stopped {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut redis(REPLICA).await)
            .await
            .unwrap();
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .unwrap()
            .trim()
            .to_owned();
        signal("-STOP", &pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn signal(which: &str, pid: &str) {
    let status = std::process::Command::new("kill").args([which, pid]).status().unwrap();
    assert!(status.success(), "kill {which} {pid}");
}

#[tokio::test]
async fn with_a_replica_to_wait_for_every_acknowledged_write_is_on_the_replica() {
    let app = spawn(1).await;

    for i in 1..=5 {
        let answer = app
            .post_json("/data/1/40", &json!({"text": format!("m{i}"), "language": "EN"}))
            .await;
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        assert_eq!(
            replica_len(&app.keys, 40).await,
            i,
            "message {i} on the replica once answered"
        );
    }
    let batch = json!({"messages": (0..10).map(|i| json!({"customerId": 1, "dialogId": 41 + i % 2, "text": "b", "language": "EN"})).collect::<Vec<_>>()});
    let answer: Value = app.post_json("/data", &batch).await.json().await.unwrap();
    assert!(
        answer["results"].as_array().unwrap().iter().all(|r| r["status"] == 202),
        "{answer}"
    );
    assert_eq!(
        (replica_len(&app.keys, 41).await, replica_len(&app.keys, 42).await),
        (5, 5)
    );
    assert_eq!(app.consent(40, true).await.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn when_no_replica_confirms_writes_answer_503_replication_timeout_and_a_retry_stores_once() {
    let waiting = spawn(1).await;
    let not_waiting = spawn(0).await;
    let message = json!({"text": "kept", "language": "EN", "messageId": "r-1"});
    assert_eq!(
        waiting.post_json("/data/1/50", &message).await.status(),
        StatusCode::ACCEPTED
    );

    let stopped = Stopped::replica().await;
    let started = Instant::now();
    // To a dialog Redis knows: staged on the primary, unconfirmed by the replica.
    let single = waiting
        .post_json(
            "/data/1/50",
            &json!({"text": "unconfirmed", "language": "EN", "messageId": "r-2"}),
        )
        .await;
    let waited = started.elapsed();
    let batch = waiting
        .post_json(
            "/data",
            &json!({"messages": [{"customerId": 1, "dialogId": 50, "text": "b", "language": "EN", "messageId": "r-3"}]}),
        )
        .await;
    let consent = waiting.consent(50, true).await;
    // The same Redis without waiting for replicas answers at once: the 503s are the WAIT's.
    let control = not_waiting
        .post_json("/data/1/52", &json!({"text": "x", "language": "EN"}))
        .await;

    let problem = assert_problem(single, StatusCode::SERVICE_UNAVAILABLE, "replication_timeout").await;
    assert!(problem["detail"].as_str().unwrap().contains("replica"), "{problem}");
    assert!(waited >= Duration::from_millis(900), "answered after {waited:?}");
    assert_problem(batch, StatusCode::SERVICE_UNAVAILABLE, "replication_timeout").await;
    assert_problem(consent, StatusCode::SERVICE_UNAVAILABLE, "replication_timeout").await;
    assert_eq!(control.status(), StatusCode::ACCEPTED);
    drop(stopped);

    // Retried with the same messageId once the replica is back: the primary had staged
    // it, so it is a duplicate with its first seq, and the replica holds it once.
    let retry: Value = wait_until(Duration::from_secs(10), async || {
        let answer = waiting
            .post_json(
                "/data/1/50",
                &json!({"text": "unconfirmed", "language": "EN", "messageId": "r-2"}),
            )
            .await;
        match answer.status() {
            StatusCode::ACCEPTED => Ok(answer.json::<Value>().await.unwrap()),
            status => Err(format!("the retry answered {status}")),
        }
    })
    .await;
    assert_eq!(
        (retry["seq"].as_i64(), retry["duplicate"].as_bool()),
        (Some(2), Some(true)),
        "{retry}"
    );
    // r-1, r-2 and the batch's r-3: each once.
    assert_eq!(replica_len(&waiting.keys, 50).await, 3);
}

#[tokio::test]
async fn a_single_post_waiting_for_the_replicas_holds_up_no_other_single_posts_call() {
    let app = spawn(1).await;
    let dialogs = [56, 57, 58];
    for dialog in dialogs {
        let first = app
            .post_json(
                &format!("/data/1/{dialog}"),
                &json!({"text": "first", "language": "EN"}),
            )
            .await;
        assert_eq!(first.status(), StatusCode::ACCEPTED);
    }
    let primary_len = async |dialog: i64| -> usize {
        redis::cmd("LLEN")
            .arg(app.keys.msgs(dialog))
            .query_async(&mut redis(PRIMARY).await)
            .await
            .unwrap()
    };

    // With the replica stopped, every write waits for the replicas' 1 s bound. Single
    // POSTs are staged one script call at a time; each next one is sent once the one
    // before is staged, and must not wait for that one's confirmation to be staged itself
    // (it did: a slow replica let a process stage one call of single POSTs per second).
    let stopped = Stopped::replica().await;
    let mut answers = Vec::new();
    for dialog in dialogs {
        let request = app
            .http
            .post(format!("{}/data/1/{dialog}", app.base))
            .json(&json!({"text": "second", "language": "EN"}));
        answers.push(tokio::spawn(request.send()));
        wait_until(Duration::from_secs(5), async || match primary_len(dialog).await {
            2 => Ok(()),
            n => Err(format!("dialog {dialog} has {n} staged")),
        })
        .await;
    }
    assert!(
        !answers[0].is_finished(),
        "the first POST was answered before the third was staged: its confirmation held up the calls after it"
    );
    drop(stopped);
    for answer in answers {
        let answer = answer.await.unwrap().unwrap();
        if answer.status() != StatusCode::ACCEPTED {
            assert_problem(answer, StatusCode::SERVICE_UNAVAILABLE, "replication_timeout").await;
        }
    }
}
