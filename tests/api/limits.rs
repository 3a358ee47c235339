//! Limits that protect the service: requests in flight, request time, header time.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, assert_problem, spawn_api_only, test_settings};

/// Opens a connection and sends a POST whose body never finishes: the request is in
/// flight (admitted, reading its body) until the connection closes. Returns once dapi
/// has started reading the body — it answers `Expect: 100-continue` then, and only
/// then — so the request holds its in-flight slot from that moment on.
async fn stalled_post(app: &TestApp) -> TcpStream {
    let mut stream = send_raw(
        app,
        b"POST /data/1/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut byte)).await;
        read.expect("dapi answered the request's headers").unwrap();
        answer.push(byte[0]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 100 "), "{answer}");
    stream.write_all(b"{\"te").await.unwrap();
    stream
}

/// Opens a connection to `app` and writes `bytes` as they are.
async fn send_raw(app: &TestApp, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

#[tokio::test]
async fn past_the_in_flight_bound_requests_are_503_at_once() {
    let mut settings = test_settings();
    settings.max_in_flight = 1;
    let app = spawn_api_only(settings).await;
    let _stalled = stalled_post(&app).await;

    let response = app.get("/data/").await;

    assert_eq!(
        response.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    // Operations endpoints stay outside the bound.
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_request_past_its_time_is_503_request_timeout() {
    let mut settings = test_settings();
    settings.request_timeout = Duration::from_millis(300);
    let app = spawn_api_only(settings).await;
    let mut stalled = stalled_post(&app).await;

    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut answer)).await;

    let n = read.expect("answered before the test's bound").unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[tokio::test]
async fn a_client_that_does_not_finish_its_headers_is_disconnected() {
    let mut settings = test_settings();
    settings.header_timeout = Duration::from_millis(300);
    let app = spawn_api_only(settings).await;
    let mut stream = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();

    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;

    assert!(closed.is_ok(), "the server closed the connection");
    let answer = String::from_utf8_lossy(&rest);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// A body whose declared length is over the route's limit is refused before any of it
/// is read: the client learns at once, not after sending megabytes (or, with a length
/// it never sends, after the request's time).
#[tokio::test]
async fn a_body_declared_over_the_limit_is_413_before_it_is_read() {
    let app = spawn_api_only(test_settings()).await;
    let mut stream = send_raw(
        &app,
        b"POST /data/1/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n{}",
    )
    .await;

    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;

    read.expect("dapi answered and closed").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    assert_eq!(app.staged_len(1).await, 0);
}
