//! Compressed bodies: gzip and zstd requests, limits on the decoded size enforced while
//! decoding, problem+json for what does not decode or is not supported, compressed reads.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::Dapi;
use crate::helpers::{TestApp, assert_problem, spawn_app, test_settings};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `size` bytes of filler, compressed: a bomb (deflate's best ratio is about 1000:1).
fn gzip_bomb(size: usize, level: flate2::Compression) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
    let chunk = vec![b' '; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        encoder.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    encoder.finish().unwrap()
}

async fn post_encoded(app: &TestApp, path: &str, encoding: &str, body: Vec<u8>) -> reqwest::Response {
    app.http
        .post(format!("{}{path}", app.base))
        .header("content-type", "application/json")
        .header("content-encoding", encoding)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn gzip_and_zstd_bodies_are_staged_like_plain_ones() {
    let app = spawn_app().await;
    let single = json!({"text": "compressed", "language": "EN"}).to_string();
    let batch = json!({"messages": [{"customerId": 1, "dialogId": 2, "text": "zstd", "language": "EN"}]}).to_string();

    let gz = post_encoded(&app, "/data/1/2", "gzip", gzip(single.as_bytes())).await;
    let zs = post_encoded(&app, "/data", "zstd", zstd::encode_all(batch.as_bytes(), 3).unwrap()).await;

    assert_eq!(gz.status(), StatusCode::ACCEPTED);
    assert_eq!(zs.status(), StatusCode::OK);
    let zs: Value = zs.json().await.unwrap();
    assert_eq!(
        (zs["results"][0]["status"].as_i64(), zs["results"][0]["seq"].as_i64()),
        (Some(202), Some(2))
    );
    app.consent(2, true).await;
    app.wait_for_seqs(2, &[1, 2]).await;
}

#[tokio::test]
async fn a_body_that_does_not_decode_is_400_and_other_encodings_are_415() {
    let app = spawn_app().await;
    let body = json!({"text": "t", "language": "EN"}).to_string();
    let mut corrupt = gzip(body.as_bytes());
    let middle = corrupt.len() / 2;
    corrupt[middle..].iter_mut().for_each(|b| *b = !*b);

    let response = post_encoded(&app, "/data/1/3", "gzip", corrupt).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "malformed_body").await;
    let response = post_encoded(&app, "/data/1/3", "zstd", b"not zstd at all".to_vec()).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "malformed_body").await;
    for other in ["br", "deflate", "compress", "gzip, gzip"] {
        let response = post_encoded(&app, "/data/1/3", other, body.clone().into_bytes()).await;
        assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding").await;
    }
    assert_eq!(
        app.consent(3, true).await.status(),
        StatusCode::NOT_FOUND,
        "nothing was staged"
    );
}

#[tokio::test]
async fn coding_names_match_in_any_case_and_every_refusal_is_problem_json() {
    let app = spawn_app().await;
    let body = |n: i32| json!({"text": format!("message {n}"), "language": "EN"}).to_string();

    let gz = post_encoded(&app, "/data/1/6", "GZIP", gzip(body(1).as_bytes())).await;
    let xgz = post_encoded(&app, "/data/1/6", "x-gzip", gzip(body(2).as_bytes())).await;
    let zs = post_encoded(
        &app,
        "/data/1/6",
        "Zstd",
        zstd::encode_all(body(3).as_bytes(), 3).unwrap(),
    )
    .await;
    let id = post_encoded(&app, "/data/1/6", "Identity", body(4).into_bytes()).await;

    let statuses = [gz.status(), xgz.status(), zs.status(), id.status()];
    assert_eq!(statuses, [StatusCode::ACCEPTED; 4]);
    for other in ["BR", "gzip, zstd", "x-compress"] {
        let response = post_encoded(&app, "/data/1/6", other, body(5).into_bytes()).await;
        assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding").await;
    }
    assert_eq!(app.staged_len(6).await, 4);
}

#[tokio::test]
async fn every_gzip_member_is_decoded_and_trailing_garbage_is_400() {
    let app = spawn_app().await;
    let text = json!({"text": "in two members", "language": "EN"}).to_string();
    let (first, second) = text.split_at(text.len() / 2);
    let mut members = gzip(first.as_bytes());
    members.extend(gzip(second.as_bytes()));
    let mut trailing = gzip(text.as_bytes());
    trailing.extend(b"junk");

    let response = post_encoded(&app, "/data/1/7", "gzip", members).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let response = post_encoded(&app, "/data/1/7", "gzip", trailing).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "malformed_body").await;

    assert_eq!(app.staged_len(7).await, 1, "only the whole body was staged");
}

/// A zstd frame may ask for a window of up to 8 MiB (RFC 9659); one that asks for zstd's
/// own maximum would make the decoder allocate 128 MiB for a few bytes of body.
#[tokio::test]
async fn a_zstd_body_asking_for_a_window_over_8_mib_is_400() {
    let app = spawn_app().await;
    let body = json!({"text": "t", "language": "EN"}).to_string();
    let framed = |window_log: u32| {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(window_log).unwrap();
        encoder.write_all(body.as_bytes()).unwrap();
        encoder.finish().unwrap()
    };

    let response = post_encoded(&app, "/data/1/8", "zstd", framed(27)).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "malformed_body").await;
    let response = post_encoded(&app, "/data/1/8", "zstd", framed(23)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_small_compressed_bomb_is_413_against_the_decoded_limit() {
    let app = spawn_app().await;
    // ~5 KB that decodes to 5 MB: over the single POST's 64 KiB and the batch's 4 MiB.
    let bomb = gzip_bomb(5 << 20, flate2::Compression::best());
    assert!(bomb.len() < 10_000, "{} bytes", bomb.len());

    for path in ["/data/1/4", "/data", "/consents/4"] {
        let response = post_encoded(&app, path, "gzip", bomb.clone()).await;
        assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    }
}

#[tokio::test]
async fn reads_are_compressed_when_the_client_accepts_it() {
    let app = spawn_app().await;
    for i in 0..20 {
        app.stage(1, 5, &format!("message number {i}"), "EN").await;
    }
    app.consent(5, true).await;
    app.wait_for_seqs(5, &(1..=20).collect::<Vec<_>>()).await;

    let response = app
        .http
        .get(format!("{}/data/", app.base))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let compressed = response.bytes().await.unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&compressed[..]), &mut plain).unwrap();
    let page: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(page["count"], 20);
    let plain_answer = app.get("/data/").await;
    assert!(
        plain_answer.headers().get("content-encoding").is_none(),
        "not without Accept-Encoding"
    );
    for (accepted, compressed) in [("*", true), ("gzip;q=0, *;q=0.5", true), ("*;q=0", false)] {
        let response = app
            .http
            .get(format!("{}/data/", app.base))
            .header("accept-encoding", accepted)
            .send()
            .await
            .unwrap();
        let coding = response.headers().get("content-encoding").map(|v| v.to_str().unwrap());
        assert_eq!(coding.is_some(), compressed, "Accept-Encoding: {accepted}: {coding:?}");
        assert_ne!(coding, Some("gzip"), "Accept-Encoding: {accepted}");
    }
}

/// Peak resident memory (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_bomb_never_expands_in_the_processes_memory() {
    let settings = test_settings();
    let dapi = Dapi::start(&settings, &["serve"], &[("DAPI_ALLOW_OPEN", "true")]).await;
    let base = dapi.base.clone();
    // 256 MiB once decoded, ~250 KB on the wire, against the batch's 4 MiB limit.
    let bomb = gzip_bomb(256 << 20, flate2::Compression::fast());
    let http = reqwest::Client::new();
    let before = peak_rss_kib(dapi.pid());

    let response = http
        .post(format!("{base}/data"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let grown_mib = (peak_rss_kib(dapi.pid()).saturating_sub(before)) / 1024;
    // Decoding stops at the 4 MiB limit: the peak may grow by about that, never by
    // anything near the 256 MiB the bomb holds.
    assert!(grown_mib < 32, "peak RSS grew by {grown_mib} MiB");
    println!("peak RSS before {before} KiB, grown by {grown_mib} MiB for a 256 MiB bomb"); // allow: the measured figure, for BENCHMARKS.md
}
