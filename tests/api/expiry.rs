//! How long Redis keeps what dapi writes (docs/api.md, Guarantee 5): every key but the
//! flush streams expires; a dialog's keys last at least `DAPI_STAGING_TTL` after its
//! last message, and a lowered TTL takes effect at the next one; a refusal PostgreSQL
//! has not erased yet does not expire at all.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    assert_problem, drain, flusher, meta_field, post_to, pttl, spawn_api_only, stored_texts, test_settings,
};
use crate::outage::without_postgres;

#[tokio::test]
async fn every_key_dapi_writes_expires_but_the_flush_streams_and_the_swept_customer_indexes() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 60, "pending", "EN").await;
    app.stage(1, 61, "granted", "EN").await;
    app.consent(61, true).await;
    app.stage(1, 62, "refused", "EN").await;
    app.consent(62, false).await;
    app.stage(1, 63, "refused then granted", "EN").await;
    app.consent(63, false).await;
    app.consent(63, true).await;
    app.stage(1, 63, "after the grant", "EN").await;
    drain(&mut flusher).await;
    app.stage(1, 61, "granted, later", "EN").await;

    let mut conn = app.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(app.keys.pattern())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() > 5, "{keys:?}");
    // The shard's customer index does not expire: the flusher role sweeps it of the
    // dialogs gone (privacy::the_customer_index_is_written_on_a_dialogs_creation_and_swept_of_dialogs_gone).
    let indexes: Vec<String> = (0..dapi::staging::SHARDS)
        .map(|k| app.keys.customer_index(k, 1))
        .collect();
    assert!(keys.iter().any(|key| indexes.contains(key)), "{keys:?}");
    for key in keys {
        if app.keys.shard_of_stream(&key).is_some() || indexes.contains(&key) {
            continue;
        }
        assert!(pttl(&app, &key).await > 0, "{key} never expires");
    }
}

/// Guarantee 5's bounds: a dialog's keys last at least the TTL after its last message and
/// at most 1 % longer (ingest.lua refreshes an expiry only when less than the TTL is left),
/// however its messages fall (probed after each of a dozen, 70 ms apart against a slack
/// of 600 ms), after a grant (which sets the expiry itself), after a flush that emptied
/// the list (RPUSH creates it anew) — and the same for its messageIds and their window,
/// also after their hash vanished.
#[tokio::test]
async fn a_dialogs_keys_last_at_least_the_ttl_after_its_last_message() {
    let mut settings = test_settings();
    settings.staging_ttl = Duration::from_secs(60);
    settings.idempotency_window = Duration::from_secs(120);
    let app = spawn_api_only(settings).await;
    let (ttl, window) = (60_000, 120_000);
    let dialog = 65;
    let mut flusher = flusher(&app);
    let mut sent = 0;
    let mut post = async |message_id: bool| {
        sent += 1;
        let mut body = serde_json::json!({"text": "one more", "language": "EN"});
        if message_id {
            body["messageId"] = format!("m-{sent}").into();
        }
        // Taken before the request: the expiry was set after it.
        let posted = std::time::Instant::now();
        let response = app.post_json(&format!("/data/1/{dialog}"), &body).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        posted
    };
    let probe = async |what: &str, posted: std::time::Instant, key: &str, ttl: i64| {
        let left = pttl(&app, key).await;
        let since = posted.elapsed().as_millis() as i64;
        assert!(
            left >= ttl - since && left <= ttl + ttl / 100,
            "{what}, {key}: {left} ms left, {since} ms after the message"
        );
    };
    let keys = [app.keys.meta(dialog), app.keys.msgs(dialog)];

    for n in 0..12 {
        let posted = post(false).await;
        for key in &keys {
            probe(&format!("message {n}"), posted, key, ttl).await;
        }
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    assert!(app.consent(dialog, true).await.status().is_success());
    let posted = post(false).await;
    for key in &keys {
        probe("after the grant", posted, key, ttl).await;
    }
    drain(&mut flusher).await;
    assert_eq!(app.staged_len(dialog).await, 0, "the flush emptied the list");
    let posted = post(false).await;
    for key in &keys {
        probe("after the flush", posted, key, ttl).await;
    }
    for n in 0..6 {
        let posted = post(true).await;
        for key in &keys {
            probe(&format!("message {n} with an id"), posted, key, ttl).await;
        }
        probe(
            &format!("message {n} with an id"),
            posted,
            &app.keys.ids(dialog),
            window,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    // A messageIds hash that vanished (evicted, deleted by hand) takes its deadline with it.
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(app.keys.ids(dialog))
        .query_async(&mut conn)
        .await
        .unwrap();
    let posted = post(true).await;
    probe("after the messageIds vanished", posted, &app.keys.ids(dialog), window).await;
}

/// A lowered TTL (or messageId window) takes effect at a dialog's next message, though
/// the expiry set under the longer one is not yet due for a refresh.
#[tokio::test]
async fn a_lowered_ttl_takes_effect_at_the_next_message() {
    let mut long = test_settings();
    long.staging_ttl = Duration::from_secs(600);
    long.idempotency_window = Duration::from_secs(1200);
    let mut short = long.clone();
    short.staging_ttl = Duration::from_secs(10);
    short.idempotency_window = Duration::from_secs(20);
    let before = spawn_api_only(long).await;
    let after = spawn_api_only(short).await;
    let body = |id: &str| json!({"text": "hello", "language": "EN", "messageId": id});
    let dialog = 66;
    assert_eq!(
        before
            .post_json(&format!("/data/1/{dialog}"), &body("a"))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert!(pttl(&before, &before.keys.meta(dialog)).await > 590_000);

    let response = after.post_json(&format!("/data/1/{dialog}"), &body("b")).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    for (key, most) in [
        (after.keys.meta(dialog), 10_100),
        (after.keys.msgs(dialog), 10_100),
        (after.keys.ids(dialog), 20_200),
    ] {
        let left = pttl(&after, &key).await;
        assert!(left > 0 && left <= most, "{key}: {left} ms left, at most {most}");
    }
}

#[tokio::test]
async fn a_retry_for_a_dialog_redis_forgot_creates_nothing_that_never_expires() {
    let app = spawn_api_only(test_settings()).await;
    let body = json!({"text": "once", "language": "EN", "messageId": "r-1"});
    assert_eq!(app.post_json("/data/1/101", &body).await.status(), StatusCode::ACCEPTED);
    app.forget(101).await; // the dialog's keys, not its messageIds (a shorter TTL)

    let retry = app.post_json("/data/1/101", &body).await;

    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["duplicate"], true);
    let mut conn = app.redis.clone();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(app.keys.meta(101))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "no dialog created for a repeat");
}

#[tokio::test]
async fn a_refusal_outlives_a_postgresql_outage_longer_than_the_ttl() {
    let mut settings = test_settings();
    settings.staging_ttl = Duration::from_secs(2);
    let app = spawn_api_only(settings).await;
    let mut flusher = flusher(&app);
    app.stage(1, 20, "refused text", "EN").await;
    app.consent(20, true).await;
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(20).await, [1]);

    let broken = without_postgres(&app).await;
    let refusal = post_to(&app, &broken, "/consents/20", json!(false)).await;
    assert_problem(refusal, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;

    // The outage outlasts the TTL: the refusal's state must not expire meanwhile.
    assert_eq!(pttl(&app, &app.keys.meta(20)).await, -1, "no expiry while unerased");
    tokio::time::sleep(Duration::from_millis(2500)).await; // Redis's clock, not ours
    assert!(meta_field(&app, 20, "x").await.is_some(), "still remembered");

    // PostgreSQL is back (the flusher reaches it): the erasure completes, and only
    // then does the refusal's TTL start.
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(20).await, Vec::<i64>::new());
    assert!(meta_field(&app, 20, "x").await.is_none());
    assert!(pttl(&app, &app.keys.meta(20)).await > 0);

    // Once forgotten, the dialog starts again at seq 1 and holds only its new text.
    app.forget(20).await;
    assert_eq!(app.stage(1, 20, "new text", "EN").await, 1);
    app.consent(20, true).await;
    drain(&mut flusher).await;
    assert_eq!(stored_texts(&app, 20).await, ["new text"]);
}
