//! What no request, and no hand edit of Redis, can do: make a body ambiguous, grow
//! `/metrics`, turn a dialog's unreadable Redis state into a 500, or hold up the flush of
//! other dialogs (the flusher sets an unreadable dialog aside, Guarantee 6).

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, drain, flusher, meta_field, spawn_api_only, test_settings};

async fn set_string(app: &TestApp, key: &str) {
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_body_that_names_a_key_twice_is_400_malformed_body_and_records_nothing() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(1, 300, "hello", "EN").await;
    let twice = br#"{"approved": true, "approved": false}"#.to_vec();
    let consent = app.post_raw("/consents/300", Some("application/json"), twice).await;
    assert_problem(consent, StatusCode::BAD_REQUEST, "malformed_body").await;
    assert_eq!(
        meta_field(&app, 300, "d").await.as_deref(),
        Some("p"),
        "no decision recorded"
    );

    let message = br#"{"text": "a", "text": "b", "language": "EN"}"#.to_vec();
    let post = app.post_raw("/data/1/300", Some("application/json"), message).await;
    assert_problem(post, StatusCode::BAD_REQUEST, "malformed_body").await;

    for batch in [
        r#"{"messages": [], "messages": [{"customerId": 1, "dialogId": 300, "text": "a", "language": "EN"}]}"#,
        r#"{"messages": [{"customerId": 1, "dialogId": 300, "dialogId": 301, "text": "a", "language": "EN"}]}"#,
        r#"{"x": {"y": 1, "y": 2}, "messages": [{"customerId": 1, "dialogId": 300, "text": "a", "language": "EN"}]}"#,
    ] {
        let answer = app
            .post_raw("/data", Some("application/json"), batch.as_bytes().to_vec())
            .await;
        assert_problem(answer, StatusCode::BAD_REQUEST, "malformed_body").await;
    }
    assert_eq!(app.staged_len(300).await, 1, "nothing staged");
    assert_eq!(app.staged_len(301).await, 0);
}

/// An id is digits only: `-0` is not one, on the path, in a batch item or in a query.
#[tokio::test]
async fn minus_zero_is_no_id_anywhere() {
    let app = spawn_api_only(test_settings()).await;
    let body = json!({"text": "a", "language": "EN"});
    assert_problem(
        app.post_json("/data/-0/1", &body).await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    )
    .await;
    assert_problem(
        app.post_json("/data/1/-0", &body).await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    )
    .await;
    let consent = app.post_json("/consents/-0", &json!({"approved": true})).await;
    assert_problem(consent, StatusCode::BAD_REQUEST, "invalid_id").await;
    let batch = r#"{"messages": [{"customerId": -0, "dialogId": 1, "text": "a", "language": "EN"},
                                 {"customerId": 1, "dialogId": -0, "text": "a", "language": "EN"}]}"#;
    let answer: Value = app
        .post_raw("/data", Some("application/json"), batch.as_bytes().to_vec())
        .await
        .json()
        .await
        .unwrap();
    for (i, field) in [(0, "customerId"), (1, "dialogId")] {
        let item = &answer["results"][i];
        assert_eq!(
            (&item["status"], &item["code"]),
            (&json!(422), &json!("invalid_body")),
            "{answer}"
        );
        assert!(item["detail"].as_str().unwrap().contains(field), "{answer}");
    }
    assert_problem(
        app.get("/data?customerId=-0").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
}

#[tokio::test]
async fn made_up_methods_never_grow_metrics() {
    let app = spawn_api_only(test_settings()).await;
    let send = async |method: &str| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        app.http
            .request(method, format!("{}/data/1/1", app.base))
            .send()
            .await
            .unwrap();
    };
    send("WARMUP").await;
    app.get("/metrics").await;
    let before = app.get("/metrics").await.text().await.unwrap();
    for i in 0..200 {
        send(&format!("M{i}{}", "X".repeat(i * 10))).await;
    }
    let after = app.get("/metrics").await.text().await.unwrap();
    assert!(!after.contains("M199"), "a request's method became a label");
    assert!(after.contains(r#"method="other""#), "{after}");
    // The same series, their counts apart: the text grows by a few digits at most.
    assert_eq!(before.lines().count(), after.lines().count());
    assert!(after.len() < before.len() + 200, "{} → {}", before.len(), after.len());
}

/// A dialog whose Redis keys hold the wrong type never answers 500: a refusal removes
/// them and succeeds; a post or a grant sets them aside (counted) and goes on as if
/// Redis had forgotten the dialog; a batch item spoils only itself.
#[tokio::test]
async fn keys_of_the_wrong_type_never_make_a_request_fail() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    // A refusal of a flushed dialog whose meta is a string: 200, and its messages erased.
    app.stage(1, 310, "stored", "EN").await;
    app.consent(310, true).await;
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(310).await, [1]);
    set_string(&app, &app.keys.meta(310)).await;
    assert_eq!(app.consent(310, false).await.status(), StatusCode::OK);
    assert!(app.stored_seqs(310).await.is_empty());
    let later = app
        .post_json("/data/1/310", &json!({"text": "x", "language": "EN"}))
        .await;
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;

    // A post to a granted dialog whose meta is a string: revived from PostgreSQL.
    app.stage(1, 311, "one", "EN").await;
    app.consent(311, true).await;
    drain(&mut flusher).await;
    set_string(&app, &app.keys.meta(311)).await;
    assert_eq!(app.stage(1, 311, "two", "EN").await, 2);
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(311).await, [1, 2]);
    // A grant of a dialog whose meta is a string: set aside, revived, granted.
    set_string(&app, &app.keys.meta(311)).await;
    assert_eq!(app.consent(311, true).await.status(), StatusCode::ACCEPTED);
    assert_eq!(meta_field(&app, 311, "d").await.as_deref(), Some("g"));
    assert_eq!(app.stage(1, 311, "three", "EN").await, 3);

    // A batch with one item on a dialog whose message list and messageIds are strings.
    app.stage(1, 312, "a", "EN").await;
    set_string(&app, &app.keys.msgs(312)).await;
    set_string(&app, &app.keys.ids(313)).await;
    let batch = json!({"messages": [
        {"customerId": 1, "dialogId": 312, "text": "b", "language": "EN"},
        {"customerId": 1, "dialogId": 313, "text": "c", "language": "EN", "messageId": "m-1"},
        {"customerId": 1, "dialogId": 314, "text": "healthy", "language": "EN"},
    ]});
    let answer: Value = app.post_json("/data", &batch).await.json().await.unwrap();
    for i in 0..3 {
        assert_eq!(answer["results"][i]["status"], 202, "{answer}");
    }
    assert_eq!(app.staged_len(314).await, 1);
    let index = app.quarantine_index().await;
    for dialog in ["311", "312", "313"] {
        assert!(index.contains_key(dialog), "{dialog}: {index:?}");
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let set_aside = crate::helpers::metric(&metrics, "dapi_request_quarantined_total").unwrap_or(0.0);
    assert!(set_aside >= 4.0, "{set_aside}");
}

#[tokio::test]
async fn an_unreadable_dialog_is_set_aside_and_the_rest_of_its_batch_flushed() {
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
