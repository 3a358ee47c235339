//! What Redis forgets, PostgreSQL still tells: a granted dialog continues its seqs, a
//! refusal keeps refusing until its TTL has passed and erases the whole dialog, a
//! messageId retried is a duplicate, a grant after a lost refusal stores only what
//! follows; Redis restarting while a batch is in flight, a dialog revived or forgotten
//! while a batch commits, a refusal flushed after the dialog's next life began. Redis
//! forgetting is a `DEL` of the dialog's keys; a PostgreSQL outage is a second API on
//! the same Redis whose PostgreSQL is unreachable; the flusher is driven through its
//! seams (`next_batch`, `store_batch`, `finish_batch`). A failover: tests/api/failover.rs.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    assert_problem, drain, flusher, meta_field, post_to, spawn_api_only, spawn_app, stored_texts, test_settings,
};
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

/// docs/api.md: 404 only when dapi knows nothing of the dialog. PostgreSQL still holds the
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
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
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

#[tokio::test]
async fn a_granted_dialog_redis_forgot_continues_its_seq_without_a_new_consent() {
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
async fn a_dialog_redis_forgot_takes_messages_while_postgresql_is_away_and_the_flusher_settles_it() {
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
async fn a_refusal_erases_the_whole_dialog_even_when_redis_restarted_its_seqs() {
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

#[tokio::test]
async fn a_refusal_flushed_late_never_erases_what_the_dialogs_next_life_stored() {
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
