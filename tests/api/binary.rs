//! The built `dapi` binary, as an operator runs it: configured by environment, logging
//! to stderr, stopped by SIGTERM, answering the operations endpoints in every role.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dapi::app::Roles;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::Dapi;
use crate::cleanup::Cleanup;
use crate::helpers::{assert_problem, spawn_app_with, test_settings};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_binary_logs_no_token_and_no_customer_text_and_exits_0_on_sigterm() {
    let settings = test_settings();
    let _cleanup = Cleanup::new(&settings);
    let port = free_port();
    let dapi = Command::new(env!("CARGO_BIN_EXE_dapi"))
        .env("DATABASE_URL", &settings.database_url)
        .env("REDIS_URL", &settings.redis_url)
        .env("DAPI_REDIS_PREFIX", &settings.redis_prefix)
        .env("DAPI_BIND", format!("127.0.0.1:{port}"))
        .env("DAPI_INGEST_TOKENS", "secret-ingest-7f3a")
        .env("DAPI_READ_TOKENS", "secret-read-9c1e")
        .env("DAPI_LOG", "debug")
        .env("DAPI_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "dapi did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(dapi.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || dapi.wait_with_output())
        .await
        .unwrap()
        .unwrap();

    assert!(output.status.success(), "exit status {:?}", output.status);
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(
        logs.contains("request_id"),
        "requests are logged with their id:\n{logs}"
    );
    assert!(!logs.contains("secret-"), "a token in the logs:\n{logs}");
    assert!(!logs.contains("customer-said"), "customer text in the logs:\n{logs}");
}

/// The value of an unlabelled series in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn a_flusher_process_answers_healthz_readyz_and_metrics_of_its_own_work() {
    // Arrange: an API without flushers, and a `dapi flusher` process beside it.
    let settings = test_settings();
    let api = spawn_app_with(
        settings.clone(),
        Roles {
            http: true,
            flusher: false,
        },
    )
    .await;
    let bind = format!("127.0.0.1:{}", free_port());
    let mut flusher = Dapi::start(&settings, &["flusher"], &[("DAPI_BIND", &bind)]).await;
    let base = format!("http://{bind}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the flusher does not answer /healthz:\n{}",
            flusher.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Act: a message is staged and granted through the API; only the flusher can store it.
    api.stage(1, 1, "hi", "EN").await;
    assert_eq!(api.consent(1, true).await.status(), StatusCode::ACCEPTED);
    api.wait_for_seqs(1, &[1]).await;

    // Assert: the operations endpoints answer, and /metrics counts the flush.
    let healthz = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), StatusCode::OK);
    let readyz = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), StatusCode::OK);
    assert_eq!(readyz.json::<serde_json::Value>().await.unwrap()["status"], "ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.unwrap();
        assert!(metric(&text, "dapi_flush_queue_length").is_some(), "{text}");
        if metric(&text, "dapi_flushed_messages_total") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the flush is not in /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let base = dapi.base.clone().unwrap();
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
