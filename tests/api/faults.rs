//! docs/api.md's guarantees under faults: processes killed at any instant, PostgreSQL and
//! Redis outages, several processes, shutdown under load, retention.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{Dapi, Ledger, Proxy, drive, through, upstream_of};
use crate::helpers::{assert_problem, metric, spawn_api_only, spawn_full, test_settings, wait_until};

fn shared(bases: &[&Dapi]) -> Arc<Mutex<Vec<String>>> {
    Arc::new(Mutex::new(bases.iter().map(|d| d.base.clone()).collect()))
}

const POSTGRES_ERRORS: &str = r#"dapi_store_errors_total{store="postgres"}"#;

/// Runs load through one `dapi serve`, stops it with `stop` part-way, starts another,
/// lets the load finish, and checks the stores against the ledger.
async fn stop_and_restart_under_load(
    settings: dapi::config::Settings,
    dialogs: std::ops::Range<i64>,
    stop: impl AsyncFnOnce(&mut Dapi),
) {
    let app = spawn_api_only(settings.clone()).await;
    let mut first = Dapi::start(&settings, &["serve"], &[]).await;
    let bases = shared(&[&first]);
    let ledger = Arc::new(Ledger::default());
    let total = (dialogs.end - dialogs.start) as usize * 6;
    let load = tokio::spawn(drive(
        bases.clone(),
        dialogs,
        6,
        ledger.clone(),
        CancellationToken::new(),
    ));

    ledger.wait_for_acked(total / 3).await;
    stop(&mut first).await;
    assert!(
        !load.is_finished(),
        "the load was over before the stop: nothing was interrupted"
    );
    let second = Dapi::start(&settings, &["serve"], &[]).await;
    *bases.lock().unwrap() = vec![second.base.clone()];
    load.await.unwrap();

    app.wait_for_empty_queue().await;
    ledger.verify(&app.store).await;
}

#[tokio::test]
async fn kill_9_during_traffic_then_restart_loses_and_doubles_nothing() {
    stop_and_restart_under_load(test_settings(), 1000..1060, async |dapi: &mut Dapi| dapi.kill9()).await;
}

#[tokio::test]
async fn a_flusher_killed_between_commit_and_ack_is_finished_by_its_restart_after_the_claim_idle_time() {
    let mut settings = test_settings();
    // Every start reads under new consumer names: the dead process's pending entry is
    // claimed once it has been idle this long.
    settings.flush_claim_idle = Duration::from_secs(2);
    let app = spawn_api_only(settings.clone()).await;
    let mut crashing = Dapi::start(&settings, &["serve"], &[("DAPI_FAILPOINT", "crash-after-commit")]).await;
    let base = crashing.base.clone();
    let http = reqwest::Client::new();
    for text in ["a", "b", "c"] {
        let r = http
            .post(format!("{base}/data/1/42"))
            .json(&json!({"text": text, "language": "EN"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let grant = http
        .post(format!("{base}/consents/42"))
        .json(&json!(true))
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), StatusCode::ACCEPTED);

    let status = crashing
        .exit_within(Duration::from_secs(20))
        .await
        .expect("the failpoint aborts the process");
    assert!(!status.success());
    assert_eq!(app.stored_seqs(42).await, [1, 2, 3], "committed before the crash");
    let _restarted = Dapi::start(&settings, &["serve"], &[]).await;

    app.wait_for_empty_queue().await;
    assert_eq!(app.stored_seqs(42).await, [1, 2, 3]);
    assert_eq!(app.get_json("/data/").await["count"], 3);
    assert_eq!(app.staged_len(42).await, 0, "trimmed from Redis once acknowledged");
}

#[tokio::test]
async fn a_dead_consumers_entries_are_claimed_by_another_process_after_the_idle_time() {
    let mut settings = test_settings();
    settings.flush_claim_idle = Duration::from_millis(800);
    let app = spawn_api_only(settings.clone()).await;
    // A flusher of another host (names never repeat anyway): only XAUTOCLAIM recovers.
    let mut crashing = Dapi::start(
        &settings,
        &["serve"],
        &[("DAPI_FAILPOINT", "crash-after-commit"), ("HOSTNAME", "elsewhere")],
    )
    .await;
    let base = crashing.base.clone();
    let http = reqwest::Client::new();
    let staged = http
        .post(format!("{base}/data/1/43"))
        .json(&json!({"text": "x", "language": "EN"}))
        .send()
        .await
        .unwrap();
    assert_eq!(staged.status(), StatusCode::ACCEPTED);
    let grant = http
        .post(format!("{base}/consents/43"))
        .json(&json!(true))
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), StatusCode::ACCEPTED);
    crashing
        .exit_within(Duration::from_secs(20))
        .await
        .expect("the failpoint aborts the process");

    let _other = Dapi::start(&settings, &["flusher"], &[]).await;

    app.wait_for_empty_queue().await;
    assert_eq!(app.stored_seqs(43).await, [1]);
}

#[tokio::test]
async fn through_a_postgresql_outage_ingest_and_grants_go_on_and_refusals_complete_later() {
    let mut settings = test_settings();
    let app = spawn_api_only(settings.clone()).await;
    let proxy = Proxy::start(upstream_of(&settings.database_url)).await;
    settings.database_url = through(&settings.database_url, proxy.addr);
    let dapi = Dapi::start(&settings, &["serve"], &[]).await;
    let base = dapi.base.clone();
    let http = reqwest::Client::new();
    let post = |dialog: i64, text: &'static str| {
        http.post(format!("{base}/data/1/{dialog}"))
            .json(&json!({"text": text, "language": "EN"}))
            .send()
    };
    // Granted and flushed before the outage, refused during it.
    post(1, "before").await.unwrap();
    http.post(format!("{base}/consents/1"))
        .json(&json!(true))
        .send()
        .await
        .unwrap();
    app.wait_for_seqs(1, &[1]).await;

    proxy.cut();
    assert_eq!(post(2, "during").await.unwrap().status(), StatusCode::ACCEPTED);
    let grant = http
        .post(format!("{base}/consents/2"))
        .json(&json!(true))
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), StatusCode::ACCEPTED);
    let refusal = http
        .post(format!("{base}/consents/1"))
        .json(&json!(false))
        .send()
        .await
        .unwrap();
    assert_problem(refusal, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    let ready = assert_problem(ready, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
    assert!(ready["detail"].as_str().unwrap().contains("PostgreSQL"), "{ready}");
    let ledger = Arc::new(Ledger::default());
    drive(shared(&[&dapi]), 100..130, 3, ledger.clone(), CancellationToken::new()).await;
    // The flushers keep failing, backing off: wait for three more failed rounds than
    // the load's own answers counted (only the flushers fail from here on).
    let failures = async || metric(&dapi.metrics().await, POSTGRES_ERRORS).unwrap_or(0.0);
    let after_load = failures().await;
    let during = wait_until(Duration::from_secs(30), async || {
        let now = failures().await;
        (now >= after_load + 3.0)
            .then_some(now)
            .ok_or_else(|| format!("{now} PostgreSQL errors counted, {after_load} after the load"))
    })
    .await;
    assert_eq!(
        app.stored_seqs(2).await,
        Vec::<i64>::new(),
        "the proxy let a flush through"
    );
    proxy.restore();

    app.wait_for_empty_queue().await;
    app.wait_for_seqs(2, &[1]).await;
    assert_eq!(
        app.stored_seqs(1).await,
        Vec::<i64>::new(),
        "the refusal completed without a second call"
    );
    ledger.verify(&app.store).await;
    let logs = dapi.logs();
    let logged = logs.matches("flush failed").count();
    assert!(
        (1..=2).contains(&logged),
        "one line per flusher when failing starts, not one per retry ({during} PostgreSQL errors counted): {logged}\n{logs}"
    );
    // A flusher still backing off when another one has claimed and flushed its entries
    // logs its recovery at its next round (back-off at most 5 s).
    wait_until(Duration::from_secs(10), async || {
        let logs = dapi.logs();
        logs.contains("flusher recovered").then_some(()).ok_or(logs)
    })
    .await;
}

#[tokio::test]
async fn through_a_redis_outage_posts_are_503_promptly_reads_go_on_and_it_recovers() {
    let mut settings = test_settings();
    let _stores = spawn_api_only(settings.clone()).await;
    let proxy = Proxy::start(upstream_of(&settings.redis_url)).await;
    settings.redis_url = through(&settings.redis_url, proxy.addr);
    let dapi = Dapi::start(&settings, &["serve"], &[]).await;
    let base = dapi.base.clone();
    let http = reqwest::Client::new();
    let post = || {
        http.post(format!("{base}/data/1/1"))
            .json(&json!({"text": "x", "language": "EN"}))
            .send()
    };
    assert_eq!(post().await.unwrap().status(), StatusCode::ACCEPTED);

    proxy.cut();
    for _ in 0..3 {
        let started = Instant::now();
        let refused = post().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "answered within a bounded time"
        );
        assert_eq!(
            refused.headers().get("retry-after").map(|v| v.to_str().unwrap()),
            Some("1")
        );
        assert_problem(refused, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;
    }
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    let ready = assert_problem(ready, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
    assert!(ready["detail"].as_str().unwrap().contains("Redis"), "{ready}");
    let read = http.get(format!("{base}/data/")).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK, "reads need only PostgreSQL");
    proxy.restore();

    wait_until(Duration::from_secs(20), async || match post().await.unwrap().status() {
        StatusCode::ACCEPTED => Ok(()),
        status => Err(format!("dapi did not recover by itself: a POST answers {status}")),
    })
    .await;
}

#[tokio::test]
async fn two_servers_and_a_flusher_one_server_killed_midway_lose_and_double_nothing() {
    let settings = test_settings();
    let app = spawn_api_only(settings.clone()).await;
    let first = Dapi::start(&settings, &["serve", "--no-flusher"], &[]).await;
    let mut second = Dapi::start(&settings, &["serve", "--no-flusher"], &[]).await;
    let _flusher = Dapi::start(&settings, &["flusher"], &[]).await;
    let bases = shared(&[&first, &second]);
    let ledger = Arc::new(Ledger::default());
    let (dialogs, messages) = (2000..2080, 5);
    let total = (dialogs.end - dialogs.start) as usize * messages;
    let load = tokio::spawn(drive(
        bases.clone(),
        dialogs,
        messages,
        ledger.clone(),
        CancellationToken::new(),
    ));

    ledger.wait_for_acked(total / 3).await;
    second.kill9();
    assert!(
        !load.is_finished(),
        "the load was over before the kill: nothing was interrupted"
    );
    load.await.unwrap();

    app.wait_for_empty_queue().await;
    ledger.verify(&app.store).await;
}

#[tokio::test]
async fn sigterm_under_load_exits_0_in_time_and_loses_nothing() {
    let mut settings = test_settings();
    settings.shutdown_timeout = Duration::from_secs(10);
    stop_and_restart_under_load(settings, 3000..3060, async |dapi: &mut Dapi| {
        dapi.sigterm();
        let status = dapi
            .exit_within(Duration::from_secs(12))
            .await
            .expect("exits within DAPI_SHUTDOWN_TIMEOUT");
        assert!(status.success(), "{status}\n{}", dapi.logs());
    })
    .await;
}

#[tokio::test]
async fn an_undecided_dialog_is_forgotten_after_the_ttl_and_a_refused_one_refuses_until_then() {
    let mut settings = test_settings();
    settings.staging_ttl = Duration::from_secs(1);
    let app = spawn_full(settings).await;
    app.stage(1, 1, "undecided", "EN").await;
    app.stage(1, 2, "refused", "EN").await;
    assert_eq!(app.consent(2, false).await.status(), StatusCode::OK);
    let again = app
        .post_json("/data/1/2", &json!({"text": "still refused", "language": "EN"}))
        .await;
    assert_problem(again, StatusCode::CONFLICT, "consent_refused").await;

    // Expiry runs on Redis's clock, which tokio's paused time cannot move: wait for it,
    // bounded.
    let mut conn = app.redis.clone();
    let keys = [app.keys.meta(1), app.keys.msgs(1), app.keys.meta(2)];
    wait_until(Duration::from_secs(10), async || {
        let left: usize = redis::cmd("EXISTS").arg(&keys).query_async(&mut conn).await.unwrap();
        (left == 0)
            .then_some(())
            .ok_or_else(|| format!("{left} of {keys:?} not expired"))
    })
    .await;

    assert_problem(app.consent(1, true).await, StatusCode::NOT_FOUND, "dialog_not_found").await;
    assert_eq!(
        app.stage(1, 2, "a new start", "EN").await,
        1,
        "the refusal is forgotten too"
    );
}

#[tokio::test]
async fn a_customer_erasure_killed_mid_way_is_finished_by_the_next_process_with_an_exact_receipt() {
    let settings = test_settings();
    let app = spawn_api_only(settings.clone()).await;
    // Customer 77: 1200 dialogs of 2 messages, the even ones granted and flushed, the odd
    // ones pending in Redis; customer 78's one dialog stays.
    let dialogs = 770_000..771_200_i64;
    for chunk in dialogs.clone().collect::<Vec<_>>().chunks(250) {
        let items: Vec<serde_json::Value> = chunk
            .iter()
            .flat_map(|&d| {
                ["one", "two"].map(|text| json!({"customerId": 77, "dialogId": d, "text": text, "language": "EN"}))
            })
            .collect();
        let answer = app.post_json("/data", &json!({ "messages": items })).await;
        assert_eq!(answer.status(), StatusCode::OK);
    }
    for d in dialogs.clone().step_by(2) {
        assert_eq!(app.consent(d, true).await.status(), StatusCode::ACCEPTED);
    }
    app.stage(78, 780_000, "someone else", "EN").await;
    let mut first = Dapi::start(&settings, &["serve"], &[]).await;
    app.wait_for_empty_queue().await;
    assert_eq!(app.get_json("/data?customerId=77").await["count"], 1200);

    // The erasure is sent; the process is killed once it has committed a batch in
    // PostgreSQL and before it completes (the receipt's counts have grown).
    let http = reqwest::Client::new();
    let delete = tokio::spawn(http.delete(format!("{}/customers/77", first.base)).send());
    let progress = wait_until(Duration::from_secs(60), async || {
        let row: Option<(uuid::Uuid, String, i64)> =
            sqlx::query_as("SELECT erasure_id, status, dialogs FROM erasures WHERE customer_id = 77")
                .fetch_optional(app.store.pool())
                .await
                .unwrap();
        match row {
            Some((id, status, dialogs)) if status == "pending" && dialogs > 0 => Ok(id),
            Some((_, status, _)) if status == "completed" => panic!("the erasure completed before the kill"),
            _ => Err("no batch committed yet".to_owned()),
        }
    });
    let id = progress.await;
    first.kill9();
    let _ = delete.await;

    // The next process (any flusher role) finishes it by itself.
    let _second = Dapi::start(&settings, &["serve"], &[]).await;
    let receipt = wait_until(Duration::from_secs(60), async || {
        let receipt = app.get_json(&format!("/erasures/{id}")).await;
        if receipt["status"] == "completed" {
            Ok(receipt)
        } else {
            Err(format!("still {receipt}"))
        }
    })
    .await;
    // Exact: every dialog and message of the customer, each once, whatever the kill cut.
    assert_eq!(
        (&receipt["dialogs"], &receipt["messages"]),
        (&json!(1200), &json!(2400)),
        "{receipt}"
    );
    assert_eq!(app.get_json("/data?customerId=77").await["count"], 0);
    for d in dialogs.clone().step_by(97) {
        assert_eq!(app.staged_len(d).await, 0, "{d}");
        assert!(app.stored_seqs(d).await.is_empty(), "{d}");
    }
    assert_eq!(app.staged_len(780_000).await, 1);
}
