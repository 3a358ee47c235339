//! The edges of the guarantees (issue 8): each hole a review found, replayed
//! deterministically against the real stores by driving the flusher through its seams
//! (`next_batch`, `store_batch`, `finish_batch`). Redis forgetting is a `DEL`; a
//! PostgreSQL outage is a second API on the same Redis whose PostgreSQL is unreachable.

use std::time::Duration;

use dapi::domain::{CustomerId, Decision, DialogId, DialogState};
use dapi::flusher::{Flusher, Outcome};
use dapi::staging::{FlushQueue, Keyspace, unique_consumer_name};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, connector, spawn_api_only, spawn_app, test_settings};
use crate::outage::without_postgres;

pub(crate) fn flusher(app: &TestApp) -> Flusher {
    let queue = FlushQueue::new(
        &connector(&app.settings),
        app.keys.clone(),
        unique_consumer_name("edges"),
        Duration::from_secs(60),
        Duration::from_millis(50),
        app.settings.staging_ttl,
    )
    .unwrap();
    Flusher::new(queue, app.store.clone(), 64)
}

/// Runs rounds until one finds nothing to do.
pub(crate) async fn drain(flusher: &mut Flusher) {
    for _ in 0..50 {
        if flusher.flush_once().await.unwrap() == Outcome::Idle {
            return;
        }
    }
    panic!("the queue never drained");
}

pub(crate) async fn meta_field(app: &TestApp, dialog: i64, field: &str) -> Option<String> {
    let mut conn = app.redis.clone();
    redis::cmd("HGET")
        .arg(app.keys.meta(dialog))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn pttl(app: &TestApp, key: &str) -> i64 {
    let mut conn = app.redis.clone();
    redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap()
}

/// What a replica holds of one dialog: its meta fields and staged messages.
pub(crate) struct Replicated {
    meta: Vec<(String, String)>,
    msgs: Vec<String>,
}

/// What a replica that stops receiving writes now would hold of `dialog`.
pub(crate) async fn replicate(app: &TestApp, dialog: i64) -> Replicated {
    let mut conn = app.redis.clone();
    let meta = redis::cmd("HGETALL")
        .arg(app.keys.meta(dialog))
        .query_async(&mut conn)
        .await
        .unwrap();
    let msgs = redis::cmd("LRANGE")
        .arg(app.keys.msgs(dialog))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    Replicated { meta, msgs }
}

/// A failover to that replica: every write to `dialog` since is lost.
pub(crate) async fn fail_over_to(app: &TestApp, dialog: i64, replica: &Replicated) {
    app.forget(dialog).await;
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(app.keys.meta(dialog))
        .arg(&replica.meta)
        .query_async(&mut conn)
        .await
        .unwrap();
    if !replica.msgs.is_empty() {
        let _: () = redis::cmd("RPUSH")
            .arg(app.keys.msgs(dialog))
            .arg(&replica.msgs)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

pub(crate) async fn stored_texts(app: &TestApp, dialog: i64) -> Vec<String> {
    sqlx::query_scalar("SELECT text FROM messages WHERE dialog_id = $1 ORDER BY seq")
        .bind(dialog)
        .fetch_all(app.store.pool())
        .await
        .unwrap()
}

pub(crate) async fn post_to(app: &TestApp, base: &str, path: &str, body: Value) -> reqwest::Response {
    app.http.post(format!("{base}{path}")).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn hole_1_a_fenced_flush_keeps_the_messages_it_did_not_write() {
    let app = spawn_api_only(test_settings()).await;
    for text in ["a", "b", "c"] {
        app.stage(1, 10, text, "EN").await;
    }
    app.consent(10, true).await;
    // Flusher A reads the dialog under the grant's epoch and is slow.
    let mut slow = flusher(&app);
    let batch = slow.next_batch().await.unwrap().expect("the grant queued the dialog");

    // A second grant moves the epoch on, and another flusher commits the dialog's row
    // under it with none of its messages (its batch's byte budget went elsewhere).
    assert_eq!(app.consent(10, true).await.status(), StatusCode::ACCEPTED);
    let epoch: i64 = meta_field(&app, 10, "e").await.unwrap().parse().unwrap();
    let newer = DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(10),
        customer: CustomerId::from_stored(1),
        decision: Decision::Granted,
        epoch,
        decided_at_us: 0,
        unerased_refusal: None,
        messages: Vec::new(),
    };
    app.store.apply(&[newer]).await.unwrap();

    // A commits: fenced, so nothing of the dialog is written — and nothing trimmed.
    let applied = slow.store_batch(&batch).await.unwrap();
    assert_eq!((applied.fenced, applied.inserted), (1, 0));
    slow.finish_batch(&batch, &applied).await.unwrap();

    assert_eq!(
        app.staged_len(10).await,
        3,
        "the acknowledged messages are still staged"
    );
    drain(&mut slow).await;
    assert_eq!(app.stored_seqs(10).await, [1, 2, 3]);
}

#[tokio::test]
async fn hole_2_a_refusal_outlives_a_postgresql_outage_longer_than_the_ttl() {
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

#[tokio::test]
async fn hole_3_a_stale_refusal_never_deletes_a_later_incarnations_rows() {
    let app = spawn_api_only(test_settings()).await;
    let mut stale = flusher(&app);
    app.stage(1, 30, "first life", "EN").await;
    app.consent(30, true).await;
    drain(&mut stale).await;

    // Refused while PostgreSQL is away; a flusher reads the refusal and stalls.
    let broken = without_postgres(&app).await;
    let refusal = post_to(&app, &broken, "/consents/30", json!(false)).await;
    assert_eq!(refusal.status(), StatusCode::SERVICE_UNAVAILABLE);
    let batch = stale.next_batch().await.unwrap().expect("the refusal queued an entry");

    // The client repeats the refusal (which completes), the dialog expires (its TTL
    // passes), and it lives again: new message, grant, flushed by another flusher.
    assert_eq!(app.consent(30, false).await.status(), StatusCode::OK);
    app.expire(30).await;
    assert_eq!(app.stage(1, 30, "second life", "EN").await, 1);
    app.consent(30, true).await;
    drain(&mut flusher(&app)).await;
    assert_eq!(stored_texts(&app, 30).await, ["second life"]);

    // The stale flusher wakes up.
    let applied = stale.store_batch(&batch).await.unwrap();
    stale.finish_batch(&batch, &applied).await.unwrap();

    assert_eq!(applied.erased, 0);
    assert_eq!(stored_texts(&app, 30).await, ["second life"]);
}

#[tokio::test]
async fn hole_4_a_refusal_erases_the_whole_dialog_not_a_seq_range() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    for text in ["a", "b", "c"] {
        app.stage(1, 40, text, "EN").await;
    }
    app.consent(40, true).await;
    drain(&mut flusher).await;
    // Redis forgets it while PostgreSQL is away: the next message starts over at seq 1.
    app.forget(40).await;
    let broken = without_postgres(&app).await;
    let staged = post_to(&app, &broken, "/data/1/40", json!({"text": "d", "language": "EN"})).await;
    assert_eq!(staged.status(), StatusCode::ACCEPTED);

    assert_eq!(app.consent(40, false).await.status(), StatusCode::OK);

    assert_eq!(app.stored_seqs(40).await, Vec::<i64>::new());
    assert_eq!(app.get_json("/data/").await["count"], 0);
}

#[tokio::test]
async fn hole_5_a_granted_dialog_redis_forgot_continues_its_seq_without_a_new_consent() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 50, "one", "EN").await;
    app.stage(1, 50, "two", "EN").await;
    app.consent(50, true).await;
    drain(&mut flusher).await;
    app.forget(50).await;

    let response = app
        .post_json("/data/1/50", &json!({"text": "three", "language": "EN"}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["seq"].as_i64(), body["consent"].as_str()),
        (Some(3), Some("granted"))
    );
    // Another customer cannot take the dialog over through the revival.
    let other = app
        .post_json("/data/2/50", &json!({"text": "x", "language": "EN"}))
        .await;
    assert_problem(other, StatusCode::CONFLICT, "customer_mismatch").await;

    drain(&mut flusher).await;
    assert_eq!(stored_texts(&app, 50).await, ["one", "two", "three"]);
}

#[tokio::test]
async fn hole_5_while_postgresql_is_away_ingest_still_answers_and_the_flusher_settles_later() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 51, "one", "EN").await;
    app.consent(51, true).await;
    drain(&mut flusher).await;
    app.forget(51).await;

    // Ingest never waits on PostgreSQL: the message is staged as unverified.
    let broken = without_postgres(&app).await;
    for text in ["two", "three"] {
        let staged = post_to(&app, &broken, "/data/1/51", json!({"text": text, "language": "EN"})).await;
        assert_eq!(staged.status(), StatusCode::ACCEPTED);
    }
    assert_eq!(meta_field(&app, 51, "u").await.as_deref(), Some("1"));

    // PostgreSQL answers again: the flusher settles the dialog (granted, seqs after the
    // stored ones) and flushes it, without a new consent.
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(51).await, [1, 2, 3]);
    assert_eq!(stored_texts(&app, 51).await, ["one", "two", "three"]);
    assert_eq!(app.stage(1, 51, "four", "EN").await, 4);
}

#[tokio::test]
async fn hole_6_every_key_dapi_writes_expires_except_the_flush_stream_and_the_swept_customer_index() {
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
    let indexes: Vec<String> = (0..dapi::staging::SHARDS).map(|k| app.keys.customer_index(k)).collect();
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
async fn hole_7_an_unreadable_dialog_is_set_aside_and_the_rest_of_its_batch_flushed() {
    let app = spawn_api_only(test_settings()).await;
    for dialog in [70, 71, 72] {
        app.stage(1, dialog, "hello", "EN").await;
        app.consent(dialog, true).await;
    }
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(app.keys.meta(71))
        .arg("d")
        .arg("?")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg(app.keys.msgs(72))
        .arg(b"not:a:message".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();

    drain(&mut flusher(&app)).await;

    assert_eq!(app.stored_seqs(70).await, [1]);
    let index = app.quarantine_index().await;
    assert_eq!(index.len(), 2, "{index:?}");
    assert!(index["71"].contains("decision"), "{index:?}");
    assert!(index["72"].contains("message"), "{index:?}");
    let kept: i64 = redis::cmd("EXISTS")
        .arg(app.keys.quarantined_meta(71))
        .arg(app.keys.quarantined_msgs(72))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 2, "set aside as they were, for an operator");
    app.wait_for_empty_queue().await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("dapi_flush_quarantined_total"), "counted in /metrics");
}

#[tokio::test]
async fn a_refusal_whose_erasure_fails_for_any_reason_answers_503_never_500() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(1, 80, "x", "EN").await;
    // Not an outage: PostgreSQL answers, with an error dapi does not class as one.
    sqlx::query("ALTER TABLE dialogs ADD CONSTRAINT no_refusals CHECK (decision <> 'refused') NOT VALID")
        .execute(app.store.pool())
        .await
        .unwrap();

    let refusal = app.consent(80, false).await;

    assert_problem(refusal, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;
    let later = app
        .post_json("/data/1/80", &json!({"text": "y", "language": "EN"}))
        .await;
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
}

/// An app whose flush entries are claimable after 300 ms of idleness.
async fn quick_claims() -> TestApp {
    let mut settings = test_settings();
    settings.flush_claim_idle = Duration::from_millis(300);
    spawn_api_only(settings).await
}

/// A flush queue of `app`'s with its claim idle time, reading briefly.
fn claiming_queue(app: &TestApp, name: &str) -> FlushQueue {
    FlushQueue::new(
        &connector(&app.settings),
        app.keys.clone(),
        name.to_owned(),
        app.settings.flush_claim_idle,
        Duration::from_millis(50),
        app.settings.staging_ttl,
    )
    .unwrap()
}

/// PostgreSQL made slow for these dialogs: their rows locked until the transaction ends.
async fn lock_dialogs(app: &TestApp, dialogs: &[i64]) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM dialogs WHERE dialog_id = ANY($1) FOR UPDATE")
        .bind(dialogs)
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

#[tokio::test]
async fn a_batch_kept_alive_is_not_claimed_by_another_flusher_however_long_it_runs() {
    let app = quick_claims().await;
    let queue = |name: &str| Flusher::new(claiming_queue(&app, name), app.store.clone(), 64);
    let (mut slow, mut other) = (queue("slow"), queue("other"));
    app.stage(1, 90, "a", "EN").await;
    app.consent(90, true).await;
    drain(&mut slow).await;
    app.stage(1, 90, "b", "EN").await;
    let batch = slow.next_batch().await.unwrap().unwrap();

    // PostgreSQL is slow: the dialog's row is locked for four claim idle times.
    let lock = lock_dialogs(&app, &[90]).await;
    let write = tokio::spawn(async move {
        let applied = slow.store_batch(&batch).await.unwrap();
        (slow, batch, applied)
    });
    tokio::time::sleep(Duration::from_millis(1200)).await; // Redis measures the idle time
    assert_eq!(
        other.flush_once().await.unwrap(),
        Outcome::Idle,
        "the batch was claimed"
    );
    lock.rollback().await.unwrap();

    let (mut slow, batch, applied) = write.await.unwrap();
    slow.finish_batch(&batch, &applied).await.unwrap();
    assert_eq!(app.stored_seqs(90).await, [1, 2]);
}

#[tokio::test]
async fn entries_read_for_later_batches_are_kept_alive_while_a_long_batch_runs() {
    let app = quick_claims().await;
    // Batches of one: a read takes one entry a shard, so with two dialogs of different
    // shards queued, one goes in the batch and the other waits, read, for the next.
    let (first, second) = (
        93,
        (94..)
            .find(|&d| Keyspace::shard_of(d) != Keyspace::shard_of(93))
            .unwrap(),
    );
    let mut slow = Flusher::new(claiming_queue(&app, "slow"), app.store.clone(), 1);
    for dialog in [first, second] {
        app.stage(1, dialog, "a", "EN").await;
        app.consent(dialog, true).await;
    }
    drain(&mut slow).await;
    for dialog in [first, second] {
        app.stage(1, dialog, "b", "EN").await;
    }
    let batch = slow.next_batch().await.unwrap().unwrap();
    assert_eq!(batch.entries.len(), 1);

    // PostgreSQL is slow: both dialogs' rows are locked for four claim idle times.
    let lock = lock_dialogs(&app, &[first, second]).await;
    let write = tokio::spawn(async move {
        let applied = slow.store_batch(&batch).await.unwrap();
        (slow, batch, applied)
    });
    tokio::time::sleep(Duration::from_millis(1200)).await; // Redis measures the idle time
    let claimed = claiming_queue(&app, "other").next_entries(10).await.unwrap();
    assert!(claimed.is_empty(), "claimed from the slow flusher: {claimed:?}");
    lock.rollback().await.unwrap();

    let (mut slow, batch, applied) = write.await.unwrap();
    slow.finish_batch(&batch, &applied).await.unwrap();
    drain(&mut slow).await;
    assert_eq!(app.stored_seqs(first).await, [1, 2]);
    assert_eq!(app.stored_seqs(second).await, [1, 2]);
}

#[tokio::test]
async fn a_refusal_of_a_dialog_redis_forgot_holds_while_postgresql_is_away() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(7, 100, "granted long ago", "EN").await;
    app.consent(100, true).await;
    drain(&mut flusher).await;
    app.forget(100).await; // its keys expired

    let broken = without_postgres(&app).await;
    let refusal = post_to(&app, &broken, "/consents/100", json!(false)).await;

    assert_problem(refusal, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;
    assert!(meta_field(&app, 100, "x").await.is_some(), "the refusal is recorded");
    let later = app
        .post_json("/data/7/100", &json!({"text": "x", "language": "EN"}))
        .await;
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
    drain(&mut flusher).await;
    assert_eq!(
        app.stored_seqs(100).await,
        Vec::<i64>::new(),
        "erased once PostgreSQL is back"
    );
    let customer: i64 = sqlx::query_scalar("SELECT customer_id FROM dialogs WHERE dialog_id = 100")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(customer, 7, "the stored customer is kept");
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
async fn a_key_of_the_wrong_type_spoils_only_its_own_dialog() {
    let app = spawn_api_only(test_settings()).await;
    for dialog in [102, 103] {
        app.stage(1, dialog, "hello", "EN").await;
        app.consent(dialog, true).await;
    }
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(app.keys.msgs(103))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(app.keys.msgs(103))
        .arg("a string, not a list")
        .query_async(&mut conn)
        .await
        .unwrap();

    drain(&mut flusher(&app)).await;

    assert_eq!(app.stored_seqs(102).await, [1]);
    let index = app.quarantine_index().await;
    assert!(index.contains_key("103"), "{index:?}");
    assert_eq!(
        meta_field(&app, 103, "d").await.as_deref(),
        Some("g"),
        "its decision still holds"
    );
}

#[tokio::test]
async fn a_refusal_redis_lost_in_a_failover_is_taken_back_from_postgresql_not_flushed_for_ever() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 60, "a", "EN").await;
    app.stage(1, 60, "b", "EN").await;
    app.consent(60, true).await;
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(60).await, [1, 2]);
    // What a replica that never received the refusal holds: the granted dialog.
    let replica = replicate(&app, 60).await;

    assert_eq!(app.consent(60, false).await.status(), StatusCode::OK);
    // The failover: the refusal is gone from Redis; PostgreSQL holds it (and erased).
    fail_over_to(&app, 60, &replica).await;
    assert_eq!(app.stage(1, 60, "after the failover", "EN").await, 3);
    // Messages of the dialog set aside earlier (what the flusher's quarantine keeps),
    // which the refusal had erased and the failover brought back.
    let mut conn = app.redis.clone();
    let _: i64 = redis::cmd("RPUSH")
        .arg(app.keys.quarantined_msgs(60))
        .arg("1:1795000000000000:EN:set aside")
        .query_async(&mut conn)
        .await
        .unwrap();

    // The flusher's grant is fenced by PostgreSQL's newer refusal.
    let batch = flusher
        .next_batch()
        .await
        .unwrap()
        .expect("the message queued the dialog");
    let applied = flusher.store_batch(&batch).await.unwrap();
    assert_eq!((applied.fenced, applied.inserted), (1, 0));
    flusher.finish_batch(&batch, &applied).await.unwrap();

    // Redis has taken the refusal back: nothing staged, nothing queued, later messages
    // refused — instead of the dialog being flushed and fenced again, round after round.
    assert_eq!(meta_field(&app, 60, "d").await.as_deref(), Some("r"));
    assert_eq!(app.staged_len(60).await, 0);
    let set_aside: i64 = redis::cmd("EXISTS")
        .arg(app.keys.quarantined_msgs(60))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(set_aside, 0, "the refusal taken back erases what was set aside too");
    assert_eq!(flusher.flush_once().await.unwrap(), Outcome::Idle, "nothing re-queued");
    let later = app
        .post_json("/data/1/60", &json!({"text": "later", "language": "EN"}))
        .await;
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
    assert!(app.stored_seqs(60).await.is_empty());
}

#[tokio::test]
async fn a_decision_after_a_failover_lost_several_is_newer_than_all_of_them() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 62, "a", "EN").await;
    app.consent(62, true).await;
    drain(&mut flusher).await;
    let replica = replicate(&app, 62).await;
    // Three more decisions, all applied in PostgreSQL (the last a refusal)…
    assert_eq!(app.consent(62, false).await.status(), StatusCode::OK);
    assert_eq!(app.consent(62, true).await.status(), StatusCode::ACCEPTED);
    assert_eq!(app.consent(62, false).await.status(), StatusCode::OK);
    // …and a failover that lost all three: Redis is back at the first grant.
    fail_over_to(&app, 62, &replica).await;

    // The customer grants once more and posts: that decision is the latest.
    assert_eq!(app.consent(62, true).await.status(), StatusCode::ACCEPTED);
    let seq = app.stage(1, 62, "after the failover", "EN").await;
    drain(&mut flusher).await;

    assert_eq!(
        app.stored_seqs(62).await,
        [seq],
        "stored, not fenced by the lost refusal"
    );
    assert_eq!(meta_field(&app, 62, "d").await.as_deref(), Some("g"));
}

#[tokio::test]
async fn messages_a_lost_refusal_erased_never_come_back_with_a_later_grant() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 64, "a", "EN").await;
    app.consent(64, true).await;
    drain(&mut flusher).await;
    app.stage(1, 64, "b, staged and queued but not yet flushed", "EN").await;
    // What a replica that never received the refusal holds: the granted dialog, with b.
    let replica = replicate(&app, 64).await;
    assert_eq!(replica.msgs.len(), 1);

    assert_eq!(app.consent(64, false).await.status(), StatusCode::OK);
    assert!(app.stored_seqs(64).await.is_empty(), "the refusal erased a");
    // The failover loses the refusal: Redis is back at the grant, b staged again.
    fail_over_to(&app, 64, &replica).await;

    // The customer grants again (a decision newer than the refusal) and posts c.
    assert_eq!(app.consent(64, true).await.status(), StatusCode::ACCEPTED);
    let c = app.stage(1, 64, "c, after the new grant", "EN").await;
    drain(&mut flusher).await;

    assert_eq!(app.stored_seqs(64).await, [c], "b, erased by the refusal, stays erased");
    assert_eq!(app.staged_len(64).await, 0);
}

/// Redis losing a refused dialog (a restart without persistence, a failover) does not
/// lift the refusal: PostgreSQL holds it, and until `DAPI_STAGING_TTL` has passed since
/// it was made the dialog's messages are refused as Redis would have refused them — a
/// client's retry of an erased message included. Past the TTL the dialog is forgotten,
/// as Redis forgets it.
#[tokio::test]
async fn a_refusal_redis_lost_still_refuses_until_its_ttl_has_passed() {
    let app = spawn_app().await;
    let body = json!({"text": "erased by the refusal", "language": "EN", "messageId": "m-1"});
    assert_eq!(app.post_json("/data/1/110", &body).await.status(), StatusCode::ACCEPTED);
    app.consent(110, true).await;
    app.wait_for_seqs(110, &[1]).await;
    assert_eq!(app.consent(110, false).await.status(), StatusCode::OK);
    app.lose(110).await;

    let retry = app.post_json("/data/1/110", &body).await;
    let batch = json!({"messages": [{"customerId": 1, "dialogId": 110, "text": "new", "language": "EN"}]});
    let batch: Value = app.post_json("/data", &batch).await.json().await.unwrap();

    assert_problem(retry, StatusCode::CONFLICT, "consent_refused").await;
    assert_eq!(batch["results"][0]["code"], "consent_refused", "{batch}");
    app.expire(110).await;
    assert_eq!(app.stage(1, 110, "a new life", "EN").await, 1);
}
