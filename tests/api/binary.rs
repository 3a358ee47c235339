//! The built `dapi` binary, as an operator runs it: configured by environment, logging
//! to stderr, stopped by SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Cleanup, test_settings};

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
