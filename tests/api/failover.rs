//! What a Redis failover loses, PostgreSQL gives back: a failover to a replica that never
//! received a decision (a refusal, or several decisions) leaves Redis behind PostgreSQL,
//! and the next fenced flush takes PostgreSQL's decision back, erasing what that decision
//! erased, instead of flushing and fencing the dialog round after round. A failover is
//! played by copying a dialog's keys (what the replica holds) and writing them back
//! later, or by writing by hand what such a replica would hold.

use dapi::flusher::Outcome;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    TestApp, assert_problem, drain, flusher, meta_field, spawn_api_only, stored_texts, test_settings,
};

/// What a replica holds of one dialog: its meta fields and staged messages.
struct Replicated {
    meta: Vec<(String, String)>,
    msgs: Vec<String>,
}

/// What a replica that stops receiving writes now would hold of `dialog`.
async fn replicate(app: &TestApp, dialog: i64) -> Replicated {
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
async fn fail_over_to(app: &TestApp, dialog: i64, replica: &Replicated) {
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

/// A failover lost a refusal PostgreSQL holds: Redis says granted at an older epoch and
/// holds messages again. A fenced flush takes the refusal back from PostgreSQL instead of
/// re-queueing the dialog for ever.
#[tokio::test]
async fn a_refusal_a_failover_lost_is_reconciled_from_postgresql_by_the_fenced_flush() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 220, "a", "EN").await;
    app.consent(220, true).await;
    drain(&mut flusher).await;
    let old_epoch = meta_field(&app, 220, "e").await.unwrap();
    assert_eq!(app.consent(220, false).await.status(), StatusCode::OK);

    let mut conn = app.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(app.keys.meta(220))
        .arg(&["d", "g", "e", old_epoch.as_str(), "q", "1"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg(app.keys.msgs(220))
        .arg("2:1795000000000000:EN:came back with the failover")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("XADD")
        .arg(app.keys.flush_stream_of(220))
        .arg("*")
        .arg("d")
        .arg(220)
        .query_async(&mut conn)
        .await
        .unwrap();

    drain(&mut flusher).await;
    assert_eq!(meta_field(&app, 220, "d").await.as_deref(), Some("r"));
    assert_eq!(app.staged_len(220).await, 0);
    assert!(app.stored_seqs(220).await.is_empty());
}

/// The same for a *grant* a failover lost: PostgreSQL holds a newer grant than Redis's
/// (grant, refuse, grant again, then a failover back to the first grant). The fenced
/// flush moves Redis on to PostgreSQL's epoch, so the next flush writes what came after
/// the failover, and drops what was received before PostgreSQL's decision (erased by the
/// refusal in between).
#[tokio::test]
async fn a_grant_a_failover_lost_is_reconciled_from_postgresql_not_fenced_for_ever() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 221, "a", "EN").await;
    app.consent(221, true).await;
    drain(&mut flusher).await;
    app.stage(1, 221, "b, erased by the refusal", "EN").await;
    let replica = replicate(&app, 221).await;
    assert_eq!(app.consent(221, false).await.status(), StatusCode::OK);
    assert_eq!(app.consent(221, true).await.status(), StatusCode::ACCEPTED);
    drain(&mut flusher).await;
    fail_over_to(&app, 221, &replica).await;
    // The replica's stream still holds b's flush entry (its meta says queued).
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("XADD")
        .arg(app.keys.flush_stream_of(221))
        .arg("*")
        .arg("d")
        .arg(221)
        .query_async(&mut conn)
        .await
        .unwrap();

    let c = app.stage(1, 221, "c, after the failover", "EN").await;
    drain(&mut flusher).await;
    assert_eq!(stored_texts(&app, 221).await, ["c, after the failover"]);
    assert_eq!(app.stored_seqs(221).await, [c]);
    assert_eq!(app.staged_len(221).await, 0);
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
