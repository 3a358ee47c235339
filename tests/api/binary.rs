//! The built `dapi` binary, as an operator runs it: configured by environment, logging
//! to stderr, stopped by SIGTERM, answering the operations endpoints in every role.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::cleanup::Cleanup;
use crate::harness::Dapi;
use crate::helpers::{assert_problem, metric, spawn_api_only, test_settings, wait_until};

#[tokio::test]
async fn the_binary_logs_no_token_and_no_customer_text_and_exits_0_on_sigterm() {
    let settings = test_settings();
    let _cleanup = Cleanup::new(&settings);
    let mut dapi = Dapi::start(
        &settings,
        &["serve"],
        &[
            ("DAPI_INGEST_TOKENS", "secret-ingest-7f3a"),
            ("DAPI_READ_TOKENS", "secret-read-9c1e"),
            ("DAPI_LOG", "debug"),
            ("DAPI_LOG_FORMAT", "json"),
        ],
    )
    .await;
    let base = dapi.base.clone();
    let http = reqwest::Client::new();

    let post = |token: &'static str, text: &'static str| {
        http.post(format!("{base}/data/1/1"))
            .bearer_auth(token)
            .json(&json!({"text": text, "language": "EN"}))
    };
    assert_eq!(
        post("secret-ingest-7f3a", "customer-said-x1")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post("secret-wrong-5d2b", "customer-said-x2")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post("secret-read-9c1e", "customer-said-x3")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    let grant = http
        .post(format!("{base}/consents/1"))
        .bearer_auth("secret-ingest-7f3a")
        .json(&json!(true));
    assert_eq!(grant.send().await.unwrap().status(), StatusCode::ACCEPTED);
    let too_long = http
        .post(format!("{base}/data/1/1"))
        .bearer_auth("secret-ingest-7f3a")
        .json(&json!({"text": "customer-said-x4".repeat(3000), "language": "EN"}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_long.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("secret-"), "a token in /metrics");

    dapi.sigterm();
    let status = dapi.exit_within(Duration::from_secs(10)).await;

    let logs = dapi.logs();
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?}\n{logs}");
    assert!(
        logs.contains("request_id"),
        "requests are logged with their id:\n{logs}"
    );
    assert!(!logs.contains("secret-"), "a token in the logs:\n{logs}");
    assert!(!logs.contains("customer-said"), "customer text in the logs:\n{logs}");
}

#[tokio::test]
async fn a_flusher_process_answers_healthz_readyz_and_metrics_of_its_own_work() {
    // Arrange: an API without flushers, and a `dapi flusher` process beside it.
    let settings = test_settings();
    let api = spawn_api_only(settings.clone()).await;
    let mut flusher = Dapi::start(&settings, &["flusher"], &[]).await;
    let base = flusher.base.clone();
    let http = reqwest::Client::new();

    // Act: a message is staged and granted through the API; only the flusher can store it.
    api.stage(1, 1, "hi", "EN").await;
    assert_eq!(api.consent(1, true).await.status(), StatusCode::ACCEPTED);
    api.wait_for_seqs(1, &[1]).await;

    // Assert: the operations endpoints answer (/healthz: `Dapi::start` waited for its
    // 200), and /metrics counts the flush.
    let readyz = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), StatusCode::OK);
    assert_eq!(readyz.json::<serde_json::Value>().await.unwrap()["status"], "ready");
    // The counter is bumped just after the commit that wait_for_seqs saw.
    wait_until(Duration::from_secs(10), async || {
        let text = flusher.metrics().await;
        assert!(metric(&text, "dapi_flush_queue_length").is_some(), "{text}");
        (metric(&text, "dapi_flushed_messages_total") == Some(1.0))
            .then_some(())
            .ok_or_else(|| format!("the flush is not in /metrics:\n{text}"))
    })
    .await;
    // The API itself is not served there.
    let post = http
        .post(format!("{base}/data/1/1"))
        .json(&json!({"text": "hi", "language": "EN"}))
        .send()
        .await
        .unwrap();
    assert_problem(post, StatusCode::NOT_FOUND, "not_found").await;
    // And it stops as cleanly as the API does.
    flusher.sigterm();
    let status = flusher.exit_within(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}:\n{}",
        flusher.logs()
    );
}

#[tokio::test]
async fn a_shutdown_that_times_out_exits_non_zero_and_says_how_much_it_abandoned() {
    // Arrange: a "Redis" that accepts connections and never answers, so that /readyz is
    // in flight for about a second, far past a 200 ms shutdown bound.
    let mut settings = test_settings();
    let _cleanup = Cleanup::new(&settings);
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    settings.redis_url = format!("redis://{}", silent.local_addr().unwrap());
    settings.shutdown_timeout = Duration::from_millis(200);
    let (reached, mut redis_reached) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
            let _ = reached.try_send(());
        }
    });
    let mut dapi = Dapi::start(&settings, &["serve", "--no-flusher"], &[]).await;
    let base = dapi.base.clone();
    tokio::spawn(async move { reqwest::get(format!("{base}/readyz")).await });
    tokio::time::timeout(Duration::from_secs(10), redis_reached.recv())
        .await
        .expect("/readyz reaches for Redis");

    // Act
    dapi.sigterm();
    let status = dapi.exit_within(Duration::from_secs(10)).await;

    // Assert
    let logs = dapi.logs();
    let status = status.unwrap_or_else(|| panic!("dapi did not exit:\n{logs}"));
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("shutdown timed out"), "{logs}");
    assert!(logs.contains("still_running=1"), "{logs}");
}

#[tokio::test]
async fn single_posts_in_flight_together_share_ingest_calls_and_each_gets_its_own_seq() {
    // Arrange: 40 dialogs Redis knows (one message each), and a process of its own, so
    // that its /metrics counts only these calls.
    let settings = test_settings();
    let _cleanup = Cleanup::new(&settings);
    let dapi = Dapi::start(&settings, &["serve", "--no-flusher"], &[]).await;
    let base = dapi.base.clone();
    let http = reqwest::Client::new();
    let post = |dialog: i64, text: String| {
        http.post(format!("{base}/data/7/{dialog}"))
            .json(&json!({"text": text, "language": "EN"}))
            .send()
    };
    for dialog in 0..40 {
        assert_eq!(
            post(dialog, "first".into()).await.unwrap().status(),
            StatusCode::ACCEPTED
        );
    }
    let series = |text: &str, suffix: &str| metric(text, &format!("dapi_ingest_call_messages_{suffix}")).unwrap_or(0.0);
    let before = dapi.metrics().await;

    // Act: 200 single POSTs at once, five to each dialog.
    let posts = (0..200).map(|i| post(i % 40, format!("m{i}")));
    let answers = futures_util::future::join_all(posts).await;

    // Assert: each answered 202 with a seq of its own, 2 … 6 per dialog …
    let mut seqs = vec![Vec::new(); 40];
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        let body: serde_json::Value = answer.json().await.unwrap();
        seqs[body["dialogId"].as_u64().unwrap() as usize].push(body["seq"].as_i64().unwrap());
    }
    for (dialog, mut got) in seqs.into_iter().enumerate() {
        got.sort_unstable();
        assert_eq!(got, vec![2, 3, 4, 5, 6], "dialog {dialog}");
    }
    // … and the 200 messages went to Redis in fewer than 200 script calls.
    let after = dapi.metrics().await;
    let messages = series(&after, "sum") - series(&before, "sum");
    let calls = series(&after, "count") - series(&before, "count");
    assert_eq!(messages, 200.0, "{after}");
    assert!(calls < 200.0, "{calls} calls for 200 messages in flight together");
}
