//! What Redis forgets, PostgreSQL still tells: a messageId retried after Redis lost its
//! dialog, a grant after Redis lost a refusal, Redis restarting while a batch is in
//! flight, a dialog revived while a batch holding its later seqs commits, a refusal a
//! failover lost. Redis forgetting is a `DEL` of the dialog's keys; a PostgreSQL outage
//! is a second API on the same Redis whose PostgreSQL is unreachable; the flusher is
//! driven through its seams (`next_batch`, `store_batch`, `finish_batch`).

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::edges::{drain, fail_over_to, flusher, meta_field, post_to, replicate, stored_texts};
use crate::helpers::{spawn_api_only, test_settings};
use crate::outage::without_postgres;

/// How many rows PostgreSQL holds of `dialog` under `message_id`.
async fn stored_copies(app: &crate::helpers::TestApp, dialog: i64, message_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages WHERE dialog_id = $1 AND message_id = $2")
        .bind(dialog)
        .bind(message_id)
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_message_id_retried_after_redis_lost_the_dialog_is_a_duplicate_with_its_first_seq() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    let m5 = json!({"text": "a", "language": "EN", "messageId": "m5"});
    let first: Value = app.post_json("/data/1/200", &m5).await.json().await.unwrap();
    assert_eq!(first["seq"], 1);
    app.stage(1, 200, "b", "EN").await;
    app.consent(200, true).await;
    drain(&mut flusher).await;
    app.lose(200).await;

    let retry = app.post_json("/data/1/200", &m5).await;
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(
        (&retry["seq"], &retry["duplicate"], &retry["consent"]),
        (&json!(1), &json!(true), &json!("granted")),
        "{retry}"
    );
    // The next message continues the dialog's seq after the highest stored.
    assert_eq!(app.stage(1, 200, "c", "EN").await, 3);
    drain(&mut flusher).await;
    assert_eq!(stored_copies(&app, 200, "m5").await, 1);
    assert_eq!(stored_texts(&app, 200).await, ["a", "b", "c"]);
}

#[tokio::test]
async fn a_batch_retry_after_redis_lost_the_dialog_answers_stored_message_ids_as_duplicates() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    let item = |id: &str, text: &str| json!({"customerId": 1, "dialogId": 201, "text": text, "language": "EN", "messageId": id});
    let batch = json!({"messages": [item("m1", "one"), item("m2", "two")]});
    app.post_json("/data", &batch).await;
    app.consent(201, true).await;
    drain(&mut flusher).await;
    app.lose(201).await;

    // The retry of the whole batch, and a new message after it.
    let retry = json!({"messages": [item("m1", "one"), item("m2", "two"), item("m3", "three")]});
    let answer: Value = app.post_json("/data", &retry).await.json().await.unwrap();
    let results = &answer["results"];
    for (i, seq) in [(0, 1), (1, 2)] {
        assert_eq!(
            (&results[i]["status"], &results[i]["seq"], &results[i]["duplicate"]),
            (&json!(202), &json!(seq), &json!(true)),
            "{answer}"
        );
    }
    assert_eq!(
        (&results[2]["seq"], results[2].get("duplicate")),
        (&json!(3), None),
        "{answer}"
    );
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(201).await, [1, 2, 3]);
    assert_eq!(stored_texts(&app, 201).await, ["one", "two", "three"]);
}

/// When neither store can tell (Redis lost the dialog, PostgreSQL is away), the retry is
/// answered as new; the flusher then drops the copy: PostgreSQL never holds a messageId
/// twice for a dialog.
#[tokio::test]
async fn a_retry_nothing_could_recognise_is_dropped_by_the_flusher_not_stored_twice() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    let m1 = json!({"text": "first", "language": "EN", "messageId": "m1"});
    app.post_json("/data/1/202", &m1).await;
    app.consent(202, true).await;
    drain(&mut flusher).await;
    app.lose(202).await;

    let broken = without_postgres(&app).await;
    let retry = post_to(&app, &broken, "/data/1/202", m1.clone()).await;
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let later = json!({"text": "second", "language": "EN", "messageId": "m2"});
    assert_eq!(
        post_to(&app, &broken, "/data/1/202", later).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(meta_field(&app, 202, "u").await.as_deref(), Some("1"));

    drain(&mut flusher).await;
    assert_eq!(stored_copies(&app, 202, "m1").await, 1);
    assert_eq!(stored_texts(&app, 202).await, ["first", "second"]);
    assert_eq!(app.staged_len(202).await, 0, "the copy left Redis with the batch");
}

/// SPEC: 404 only when dapi knows nothing of the dialog. PostgreSQL still holds the
/// refusal Redis lost, so the dialog is known: a grant is 202, and only what is posted
/// after it is stored.
#[tokio::test]
async fn a_grant_after_redis_lost_a_refusal_is_accepted_and_stores_only_what_follows() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 210, "erased by the refusal", "EN").await;
    app.consent(210, true).await;
    drain(&mut flusher).await;
    assert_eq!(app.consent(210, false).await.status(), StatusCode::OK);
    app.lose(210).await;

    assert_eq!(app.consent(210, true).await.status(), StatusCode::ACCEPTED);
    let seq = app.stage(1, 210, "after the new grant", "EN").await;
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(210).await, [seq]);
    assert_eq!(stored_texts(&app, 210).await, ["after the new grant"]);

    // A refusal of a dialog whose refusal Redis lost is recorded again, likewise.
    app.lose(210).await;
    assert_eq!(app.consent(210, false).await.status(), StatusCode::OK);
    assert!(app.stored_seqs(210).await.is_empty());
}

/// A dialog staged unverified (PostgreSQL away) whose refusal Redis had lost is settled
/// as refused, not pending: its staged messages go and later ones are refused.
#[tokio::test]
async fn an_unverified_dialog_whose_refusal_redis_lost_settles_as_refused() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 211, "a", "EN").await;
    app.consent(211, true).await;
    drain(&mut flusher).await;
    assert_eq!(app.consent(211, false).await.status(), StatusCode::OK);
    app.lose(211).await;

    let broken = without_postgres(&app).await;
    let body = json!({"text": "posted while nothing could tell", "language": "EN"});
    assert_eq!(
        post_to(&app, &broken, "/data/1/211", body).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(meta_field(&app, 211, "u").await.as_deref(), Some("1"));

    drain(&mut flusher).await;
    assert_eq!(meta_field(&app, 211, "d").await.as_deref(), Some("r"));
    assert_eq!(app.staged_len(211).await, 0);
    assert!(app.stored_seqs(211).await.is_empty());
    let later = app
        .post_json("/data/1/211", &json!({"text": "later", "language": "EN"}))
        .await;
    crate::helpers::assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
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

/// Redis loses everything of this test's keyspace, as a restart without persistence.
async fn restart_redis_empty(app: &crate::helpers::TestApp) {
    let mut conn = app.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", app.keys.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
    }
}

/// Redis restarts empty while a batch is in flight, and the dialog starts a new life:
/// the old batch's finish trims nothing of it, and what both lives wrote is stored once
/// each under seqs of its own.
#[tokio::test]
async fn redis_restarting_mid_batch_keeps_the_old_batch_off_what_the_new_life_staged() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 230, "one", "EN").await;
    app.stage(1, 230, "two", "EN").await;
    app.consent(230, true).await;
    let batch = flusher.next_batch().await.unwrap().expect("queued by the grant");

    restart_redis_empty(&app).await;
    // PostgreSQL holds nothing of the dialog yet: a new pending dialog, seq 1 again.
    assert_eq!(app.stage(1, 230, "the new life", "EN").await, 1);

    let applied = flusher.store_batch(&batch).await.unwrap();
    flusher.finish_batch(&batch, &applied).await.unwrap();
    assert_eq!(app.staged_len(230).await, 1, "the new life's message stays staged");

    app.consent(230, true).await;
    drain(&mut flusher).await;
    let mut texts = stored_texts(&app, 230).await;
    texts.sort();
    assert_eq!(texts, ["one", "the new life", "two"]);
    let seqs = app.stored_seqs(230).await;
    let mut distinct = seqs.clone();
    distinct.dedup();
    assert_eq!(seqs, distinct, "no seq stored twice: {seqs:?}");
}

/// A dialog Redis forgot is revived from PostgreSQL's last seq while a batch holding
/// its later seqs is committing: the batch's messages take seqs of their own (reserved
/// in the new life), so no seq is stored twice and nothing acknowledged is dropped.
#[tokio::test]
async fn a_revival_racing_a_flush_in_flight_hands_out_no_seq_the_batch_writes() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 231, "one", "EN").await;
    app.consent(231, true).await;
    drain(&mut flusher).await;
    app.stage(1, 231, "two", "EN").await;
    app.stage(1, 231, "three", "EN").await;
    let batch = flusher.next_batch().await.unwrap().expect("queued");

    app.forget(231).await;
    // Revived from PostgreSQL, whose last seq is 1: the batch's 2 and 3 are not committed.
    let revived = app.stage(1, 231, "revived", "EN").await;
    let applied = flusher.store_batch(&batch).await.unwrap();
    flusher.finish_batch(&batch, &applied).await.unwrap();
    assert_eq!(app.staged_len(231).await, 1, "the revived message stays staged");
    drain(&mut flusher).await;

    let seqs = app.stored_seqs(231).await;
    assert_eq!(seqs.len(), 4, "{seqs:?}");
    let mut distinct = seqs.clone();
    distinct.dedup();
    assert_eq!(seqs, distinct, "no seq stored twice: {seqs:?}");
    let stored: Vec<(i64, String)> =
        sqlx::query_as("SELECT seq, text FROM messages WHERE dialog_id = 231 ORDER BY seq")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert!(stored.contains(&(revived, "revived".to_owned())), "{stored:?}");
    // The next message continues after every seq stored.
    assert_eq!(app.stage(1, 231, "next", "EN").await, seqs.last().unwrap() + 1);
}

/// Redis forgets a dialog after the snapshot, and nothing revives it before the commit:
/// the claim writes it back as the snapshot read it, so a message after continues after
/// the batch.
#[tokio::test]
async fn a_dialog_forgotten_during_a_flush_continues_after_the_batch() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 232, "one", "EN").await;
    app.stage(1, 232, "two", "EN").await;
    app.consent(232, true).await;
    let batch = flusher.next_batch().await.unwrap().expect("queued");
    app.forget(232).await;
    let applied = flusher.store_batch(&batch).await.unwrap();
    flusher.finish_batch(&batch, &applied).await.unwrap();
    assert_eq!(meta_field(&app, 232, "d").await.as_deref(), Some("g"));
    assert_eq!(app.stage(1, 232, "three", "EN").await, 3);
    drain(&mut flusher).await;
    assert_eq!(stored_texts(&app, 232).await, ["one", "two", "three"]);
}
