//! POST /consents/{dialogId}.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_api_only, spawn_app, test_settings};

#[tokio::test]
async fn a_grant_answers_202_and_the_dialog_becomes_readable() {
    let app = spawn_app().await;
    app.stage(1, 2, "Hello, World", "EN").await;
    app.stage(1, 2, "Bye", "EN").await;

    let response = app.consent(2, true).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"dialogId": 2, "approved": true})
    );
    app.wait_for_seqs(2, &[1, 2]).await;
    let page = app.get_json("/data/").await;
    assert_eq!(page["count"], 2);
    assert_eq!(page["results"][0]["text"], "Bye");
    assert_eq!(page["results"][1]["text"], "Hello, World");
}

#[tokio::test]
async fn a_message_posted_after_the_grant_arrives_too() {
    let app = spawn_app().await;
    app.stage(1, 3, "before", "EN").await;
    app.consent(3, true).await;
    app.wait_for_seqs(3, &[1]).await;

    app.stage(1, 3, "after", "EN").await;

    app.wait_for_seqs(3, &[1, 2]).await;
}

#[tokio::test]
async fn the_three_body_forms_are_accepted() {
    let app = spawn_app().await;
    for dialog in 1..=6 {
        app.stage(1, dialog, "hi", "EN").await;
    }
    let bodies = [
        (1, json!({"approved": true}), StatusCode::ACCEPTED),
        (2, json!({"approved": "True"}), StatusCode::ACCEPTED),
        (3, json!(true), StatusCode::ACCEPTED),
        (4, json!({"approved": false}), StatusCode::OK),
        (5, json!({"approved": "FALSE"}), StatusCode::OK),
        (6, json!(false), StatusCode::OK),
    ];

    for (dialog, body, status) in bodies {
        let response = app.post_json(&format!("/consents/{dialog}"), &body).await;
        assert_eq!(response.status(), status, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["dialogId"], dialog);
        assert_eq!(answer["approved"], status == StatusCode::ACCEPTED);
    }
}

#[tokio::test]
async fn an_unknown_dialog_is_404_dialog_not_found() {
    // (differs) the predecessor answered 400, and 500 to refusing a missing dialog.
    let app = spawn_app().await;

    assert_problem(app.consent(404, true).await, StatusCode::NOT_FOUND, "dialog_not_found").await;
    assert_problem(app.consent(404, false).await, StatusCode::NOT_FOUND, "dialog_not_found").await;
    // Nothing was remembered by the failed calls.
    assert_problem(app.consent(404, true).await, StatusCode::NOT_FOUND, "dialog_not_found").await;
}

#[tokio::test]
async fn bad_consent_bodies_are_4xx_and_record_nothing() {
    let app = spawn_app().await;
    app.stage(1, 1, "hi", "EN").await;

    for body in [
        json!({}),
        json!({"approved": "yes"}),
        json!({"approved": 1}),
        json!([true]),
        json!("true"),
        json!(null),
    ] {
        let response = app.post_json("/consents/1", &body).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    let malformed = app
        .post_raw("/consents/1", Some("application/json"), b"{approved".to_vec())
        .await;
    assert_problem(malformed, StatusCode::BAD_REQUEST, "malformed_json").await;
    let text = app.post_raw("/consents/1", Some("text/plain"), b"true".to_vec()).await;
    assert_problem(text, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let bad_id = app.post_json("/consents/x1", &json!(true)).await;
    assert_problem(bad_id, StatusCode::BAD_REQUEST, "invalid_id").await;

    let still_pending = app
        .post_json("/data/1/1", &json!({"text": "more", "language": "EN"}))
        .await;
    assert_eq!(still_pending.json::<Value>().await.unwrap()["consent"], "pending");
}

#[tokio::test]
async fn a_refusal_after_a_grant_erases_postgresql_before_it_answers() {
    let app = spawn_app().await;
    for text in ["a", "b", "c"] {
        app.stage(7, 10, text, "EN").await;
    }
    app.consent(10, true).await;
    app.wait_for_seqs(10, &[1, 2, 3]).await;

    let response = app.consent(10, false).await;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"dialogId": 10, "approved": false})
    );
    // No waiting: the erasure is done when the answer is sent.
    assert_eq!(app.stored_seqs(10).await, Vec::<i64>::new());
    assert_eq!(app.get_json("/data/?customerId=7").await["count"], 0);
    assert_eq!(app.get_json("/data/").await["count"], 0);
}

#[tokio::test]
async fn a_refusal_of_a_pending_dialog_erases_its_staged_messages() {
    let app = spawn_app().await;
    app.stage(1, 11, "secret", "EN").await;

    assert_eq!(app.consent(11, false).await.status(), StatusCode::OK);

    assert_eq!(app.staged_len(11).await, 0);
    // A later grant brings nothing back.
    assert_eq!(app.consent(11, true).await.status(), StatusCode::ACCEPTED);
    app.wait_for_empty_queue().await;
    assert_eq!(app.stored_seqs(11).await, Vec::<i64>::new());
}

#[tokio::test]
async fn granting_after_a_refusal_keeps_the_erased_out_and_takes_later_messages() {
    let app = spawn_app().await;
    app.stage(1, 12, "before refusal", "EN").await;
    app.consent(12, true).await;
    app.wait_for_seqs(12, &[1]).await;
    app.consent(12, false).await;

    assert_eq!(app.consent(12, true).await.status(), StatusCode::ACCEPTED);
    let seq = app.stage(1, 12, "after the new grant", "EN").await;

    assert_eq!(seq, 2);
    app.wait_for_seqs(12, &[2]).await;
    let page = app.get_json("/data/").await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["results"][0]["text"], "after the new grant");
}

/// A refusal erases the message, not the memory of its messageId: a client's retry of
/// it after a new grant is a repeat, and must not bring the erased text back.
#[tokio::test]
async fn a_retry_of_an_erased_message_after_a_new_grant_stores_nothing() {
    let app = spawn_app().await;
    let body = json!({"text": "erased by the refusal", "language": "EN", "messageId": "m-1"});
    let first: Value = app.post_json("/data/1/15", &body).await.json().await.unwrap();
    app.consent(15, true).await;
    app.wait_for_seqs(15, &[1]).await;
    assert_eq!(app.consent(15, false).await.status(), StatusCode::OK);
    assert_eq!(app.consent(15, true).await.status(), StatusCode::ACCEPTED);

    let retry = app.post_json("/data/1/15", &body).await;

    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!((&retry["seq"], &retry["duplicate"]), (&first["seq"], &json!(true)));
    let later = app.stage(1, 15, "after the new grant", "EN").await;
    assert_eq!(later, 2, "the retry took no seq");
    // Exactly `later`: a retry staged again would have been flushed with it.
    app.wait_for_seqs(15, &[later]).await;
}

#[tokio::test]
async fn nothing_of_an_undecided_dialog_is_readable() {
    let app = spawn_app().await;
    app.stage(1, 13, "pending", "EN").await;
    app.stage(1, 14, "granted", "EN").await;
    app.consent(14, true).await;

    app.wait_for_seqs(14, &[1]).await;

    let page = app.get_json("/data/").await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["results"][0]["dialogId"], 14);
    assert_eq!(app.stored_seqs(13).await, Vec::<i64>::new());
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
