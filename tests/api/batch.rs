//! `messageId` (retries that never store twice) and `POST /data` (batches with a result
//! per item), against the real stores.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use std::time::Duration;

use crate::harness::{Proxy, through, upstream_of};
use crate::helpers::{assert_problem, spawn_api_only, spawn_app, test_settings, wait_until};

#[tokio::test]
async fn a_repeated_message_id_answers_the_first_answer_and_stores_once() {
    let app = spawn_app().await;
    let body = json!({"text": "first", "language": "EN", "messageId": "m-1"});
    let first = app.post_json("/data/1/2", &body).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    assert!(first.get("duplicate").is_none(), "{first}");
    app.stage(1, 2, "no id", "EN").await;

    let retry = json!({"text": "a different text", "language": "EN", "messageId": "m-1"});
    let again = app.post_json("/data/1/2", &retry).await;

    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        (again["seq"].as_i64(), again["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
    app.consent(2, true).await;
    app.wait_for_seqs(2, &[1, 2]).await;
    let page = app.get_json("/data/").await;
    let results = page["results"].as_array().unwrap();
    let by_seq = |seq: i64| results.iter().find(|m| m["seq"] == seq).unwrap().clone();
    assert_eq!(
        (by_seq(1)["text"].as_str(), by_seq(1)["messageId"].as_str()),
        (Some("first"), Some("m-1"))
    );
    assert!(
        by_seq(2)["messageId"].is_null(),
        "messageId is null when none was given"
    );
}

#[tokio::test]
async fn a_repeat_racing_its_original_stores_once() {
    let app = spawn_app().await;
    app.stage(1, 3, "dialog exists", "EN").await;

    let body = json!({"text": "raced", "language": "EN", "messageId": "race"});
    let answers = join_all((0..8).map(|_| app.post_json("/data/1/3", &body))).await;

    let mut seqs = Vec::new();
    let mut originals = 0;
    for answer in answers {
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        let answer: Value = answer.json().await.unwrap();
        seqs.push(answer["seq"].as_i64().unwrap());
        originals += usize::from(answer.get("duplicate").is_none());
    }
    assert_eq!(originals, 1, "exactly one of the racers was staged");
    assert!(
        seqs.iter().all(|&s| s == 2),
        "every racer answers the same seq: {seqs:?}"
    );
    app.consent(3, true).await;
    app.wait_for_seqs(3, &[1, 2]).await;
}

#[tokio::test]
async fn a_bad_message_id_is_422_and_a_repeat_after_a_refusal_is_409() {
    let app = spawn_app().await;
    for bad in [json!(""), json!("has space"), json!("x".repeat(65)), json!(7)] {
        let response = app
            .post_json("/data/1/4", &json!({"text": "t", "language": "EN", "messageId": bad}))
            .await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    let body = json!({"text": "t", "language": "EN", "messageId": "a.b_c:d-1"});
    assert_eq!(app.post_json("/data/1/4", &body).await.status(), StatusCode::ACCEPTED);
    assert_eq!(app.consent(4, false).await.status(), StatusCode::OK);

    let repeat = app.post_json("/data/1/4", &body).await;

    assert_problem(repeat, StatusCode::CONFLICT, "consent_refused").await;
}

#[tokio::test]
async fn a_batch_answers_per_item_in_order_and_one_bad_item_spoils_nothing() {
    let app = spawn_app().await;
    app.stage(9, 12, "owned by customer 9", "EN").await;
    app.stage(1, 13, "to be refused", "EN").await;
    app.consent(13, false).await;
    let batch = json!({"messages": [
        {"customerId": 1, "dialogId": 11, "text": "one", "language": "EN", "messageId": "b-1"},
        {"customerId": 1, "dialogId": 11, "text": "", "language": "EN"},
        {"customerId": 1, "dialogId": 12, "text": "not mine", "language": "EN"},
        {"customerId": 1, "dialogId": 13, "text": "refused", "language": "EN"},
        {"customerId": 1, "dialogId": 11, "text": "two", "language": "EN", "messageId": "b-2"},
        {"customerId": -1, "dialogId": 11, "text": "bad id", "language": "EN"},
        "not an object",
        {"customerId": 1, "dialogId": 11, "text": "three", "language": "EN"}
    ]});

    let response = app.post_json("/data", &batch).await;

    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<i64> = results.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    assert_eq!(statuses, [202, 422, 409, 409, 202, 422, 422, 202], "{body}");
    let codes: Vec<&str> = results.iter().map(|r| r["code"].as_str().unwrap_or("")).collect();
    assert_eq!(codes[2..4], ["customer_mismatch", "consent_refused"]);
    let seqs: Vec<i64> = [0, 4, 7].iter().map(|&i| results[i]["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3], "items of one dialog get seqs in batch order");
    assert_eq!(results[0]["consent"], "pending");
    assert_eq!(
        (results[0]["customerId"].as_i64(), results[0]["dialogId"].as_i64()),
        (Some(1), Some(11))
    );
}

#[tokio::test]
async fn retrying_a_whole_batch_with_the_same_ids_stores_each_message_once() {
    let app = spawn_app().await;
    let messages: Vec<Value> = (0..50)
        .map(|i| json!({"customerId": 1, "dialogId": 20 + i % 5, "text": format!("m{i}"), "language": "EN", "messageId": format!("id-{i}")}))
        .collect();
    let batch = json!({ "messages": messages });
    let first: Value = app.post_json("/data", &batch).await.json().await.unwrap();

    let retry: Value = app.post_json("/data", &batch).await.json().await.unwrap();

    for (a, b) in first["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(retry["results"].as_array().unwrap())
    {
        assert_eq!((a["status"].as_i64(), b["status"].as_i64()), (Some(202), Some(202)));
        assert_eq!(a["seq"], b["seq"]);
        assert_eq!(b["duplicate"], true);
    }
    for dialog in 20..25 {
        app.consent(dialog, true).await;
    }
    for dialog in 20..25 {
        app.wait_for_seqs(dialog, &(1..=10).collect::<Vec<_>>()).await;
    }
    assert_eq!(app.get_json("/data/").await["count"], 50);
}

#[tokio::test]
async fn a_batch_cut_off_from_redis_part_way_answers_per_item_and_its_retry_stores_each_once() {
    // dapi's Redis connection goes through a proxy that cuts it right after the batch's
    // first script call has been answered: the item of the known dialog was staged by
    // that call; the item of the dialog Redis forgot needed the second call (after the
    // PostgreSQL lookup), which cannot be made. (A dialog this process has never staged
    // would be looked up first and created by the first call: `http::recent`.)
    let mut settings = test_settings();
    let proxy = Proxy::start(upstream_of(&settings.redis_url)).await;
    settings.redis_url = through(&settings.redis_url, proxy.addr);
    let app = spawn_api_only(settings).await;
    app.stage(1, 30, "the dialog exists", "EN").await; // also loads the ingest script
    app.stage(1, 31, "Redis will forget this", "EN").await;
    app.forget(31).await;
    let batch = json!({"messages": [
        {"customerId": 1, "dialogId": 30, "text": "known dialog", "language": "EN", "messageId": "known-1"},
        {"customerId": 1, "dialogId": 31, "text": "new dialog", "language": "EN", "messageId": "new-1"},
    ]});

    proxy.cut_after_answers(1);
    let cut = app.post_json("/data", &batch).await;

    assert_eq!(cut.status(), StatusCode::OK);
    let cut: Value = cut.json().await.unwrap();
    let results = cut["results"].as_array().unwrap();
    assert_eq!(
        (results[0]["status"].as_i64(), results[0]["seq"].as_i64()),
        (Some(202), Some(2)),
        "the first call staged the known dialog's item: {cut}"
    );
    assert_eq!(
        (results[1]["status"].as_i64(), results[1]["code"].as_str()),
        (Some(503), Some("redis_unavailable")),
        "the forgotten dialog's item was not staged: {cut}"
    );
    assert_eq!((app.staged_len(30).await, app.staged_len(31).await), (2, 0));

    proxy.restore();
    let retry: Value = wait_until(Duration::from_secs(20), async || {
        let answer = app.post_json("/data", &batch).await;
        if answer.status() != StatusCode::OK {
            return Err(format!("the retry answered {}", answer.status()));
        }
        let answer: Value = answer.json().await.unwrap();
        match answer["results"][1]["status"].as_i64() {
            Some(202) => Ok(answer),
            _ => Err(format!("Redis not back yet: {answer}")),
        }
    })
    .await;
    let results = retry["results"].as_array().unwrap();
    assert_eq!(
        (results[0]["seq"].as_i64(), results[0]["duplicate"].as_bool()),
        (Some(2), Some(true)),
        "the staged item is a duplicate on retry: {retry}"
    );
    assert_eq!(
        (results[1]["seq"].as_i64(), results[1].get("duplicate")),
        (Some(1), None),
        "the unstaged item is staged by the retry: {retry}"
    );
    assert_eq!((app.staged_len(30).await, app.staged_len(31).await), (2, 1));
}

#[tokio::test]
async fn an_unusable_batch_body_is_refused_whole_and_stages_nothing() {
    let mut settings = test_settings();
    settings.max_batch_messages = 3;
    let app = crate::helpers::spawn_full(settings).await;
    let item = json!({"customerId": 1, "dialogId": 30, "text": "t", "language": "EN"});
    for body in [
        json!([item]),
        json!([[item]]),
        json!({"messages": []}),
        json!({"messages": item}),
        json!({"messages": [item, item, item, item]}),
    ] {
        let response = app.post_json("/data", &body).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    let not_json = app.post_raw("/data", Some("text/plain"), b"{}".to_vec()).await;
    assert_problem(not_json, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let malformed = app
        .post_raw("/data", Some("application/json"), b"{\"messages\": [".to_vec())
        .await;
    assert_problem(malformed, StatusCode::BAD_REQUEST, "malformed_json").await;
    let huge = "x".repeat(app.settings.max_batch_bytes + 1);
    let too_large = app.post_raw("/data", Some("application/json"), huge.into_bytes()).await;
    assert_problem(too_large, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    assert_eq!(
        app.consent(30, true).await.status(),
        StatusCode::NOT_FOUND,
        "nothing was staged"
    );
}

/// JSON that is well-formed but that the reader cannot hold (a number past a 64-bit
/// float's range, nesting past its 128 levels) spoils only the item it stands in.
#[tokio::test]
async fn an_item_with_json_the_reader_cannot_hold_fails_alone() {
    let app = spawn_app().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let body = format!(
        r#"{{"messages": [
            {{"customerId": 1, "dialogId": 31, "text": "a", "language": "EN"}},
            {{"customerId": 1e400, "dialogId": 31, "text": "b", "language": "EN"}},
            {{"customerId": 1, "dialogId": 31, "text": "c", "language": "EN", "unknown": {deep}}},
            {{"customerId": 1, "dialogId": 31, "text": "d", "language": "EN"}}
        ]}}"#
    );

    let response = app.post_raw("/data", Some("application/json"), body.into_bytes()).await;

    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let statuses: Vec<i64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [202, 422, 422, 202], "{body}");
    assert_eq!(body["results"][1]["code"], "invalid_body");
    assert_eq!(app.staged_len(31).await, 2);
}

#[tokio::test]
async fn a_batch_may_be_larger_than_a_single_posts_body_limit() {
    let app = spawn_app().await;
    let text = "y".repeat(30_000);
    let messages: Vec<Value> = (0..4)
        .map(|i| json!({"customerId": 1, "dialogId": 40, "text": text, "language": "EN", "messageId": format!("big-{i}")}))
        .collect();
    assert!(serde_json::to_vec(&messages).unwrap().len() > app.settings.max_body_bytes);

    let response = app.post_json("/data", &json!({ "messages": messages })).await;

    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["results"].as_array().unwrap().iter().all(|r| r["status"] == 202),
        "{body}"
    );
}
