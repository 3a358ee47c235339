//! POST /data/{customerId}/{dialogId}.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn a_message_is_accepted_with_202_its_seq_and_pending_consent() {
    let app = spawn_app().await;

    let response = app
        .post_json("/data/1/2", &json!({"text": "Hello, World", "language": "EN"}))
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"customerId": 1, "dialogId": 2, "seq": 1, "consent": "pending"})
    );
}

#[tokio::test]
async fn every_post_appends_a_message_with_the_next_seq() {
    // (differs) the predecessor answered 400 to a second POST to one dialog.
    let app = spawn_app().await;

    let seqs = [
        app.stage(1, 7, "one", "EN").await,
        app.stage(1, 7, "two", "EN").await,
        app.stage(1, 7, "three", "EN").await,
    ];

    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(app.stage(1, 8, "other dialog", "EN").await, 1);
}

#[tokio::test]
async fn concurrent_posts_to_one_dialog_get_distinct_seqs() {
    // The predecessor answered 500 to concurrent duplicate POSTs.
    let app = spawn_app().await;

    let posts = (0..20).map(|_| app.stage(3, 30, "same", "EN"));
    let mut seqs = join_all(posts).await;
    seqs.sort_unstable();

    assert_eq!(seqs, (1..=20).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_dialog_known_under_another_customer_is_409_and_stores_nothing() {
    let app = spawn_app().await;
    app.stage(1, 5, "mine", "EN").await;

    let response = app
        .post_json("/data/2/5", &json!({"text": "theirs", "language": "EN"}))
        .await;

    assert_problem(response, StatusCode::CONFLICT, "customer_mismatch").await;
    assert_eq!(
        app.stage(1, 5, "mine again", "EN").await,
        2,
        "the refused post took no seq"
    );
}

#[tokio::test]
async fn ids_must_be_non_negative_integers_within_i64() {
    let app = spawn_app().await;
    let body = json!({"text": "hi", "language": "EN"});

    for path in [
        "/data/abc/1",
        "/data/1/abc",
        "/data/-1/1",
        "/data/1/9223372036854775808",
        "/data/1/1.5",
        "/data/%20/1",
    ] {
        let response = app.post_json(path, &body).await;
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_id").await;
    }
    // The predecessor answered 500 above 2^31.
    let response = app.post_json("/data/9223372036854775807/2147483648", &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn bodies_that_are_not_json_are_400_or_415() {
    let app = spawn_app().await;

    let malformed = app
        .post_raw("/data/1/1", Some("application/json"), b"{\"text\": ".to_vec())
        .await;
    assert_problem(malformed, StatusCode::BAD_REQUEST, "malformed_json").await;

    let form = app
        .post_raw(
            "/data/1/1",
            Some("application/x-www-form-urlencoded"),
            b"text=hi".to_vec(),
        )
        .await;
    assert_problem(form, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;

    let no_type = app.post_raw("/data/1/1", None, b"{}".to_vec()).await;
    assert_problem(no_type, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    // The predecessor accepted and echoed a 10 MB text.
    let app = spawn_app().await;
    let text = "x".repeat(10 * 1024 * 1024);

    let response = app
        .post_json("/data/1/1", &json!({"text": text, "language": "EN"}))
        .await;

    let body = assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(body["detail"].as_str().unwrap().contains("65536"), "{body}");
}

#[tokio::test]
async fn well_formed_but_invalid_messages_are_422_and_store_nothing() {
    let app = spawn_app().await;
    let too_long = "é".repeat(16 * 1024 + 1); // 32770 bytes
    let cases = [
        json!({"language": "EN"}),
        json!({"text": "hi"}),
        json!({"text": 5, "language": "EN"}),
        json!({"text": "hi", "language": 5}),
        json!({"text": null, "language": "EN"}),
        json!({"text": "", "language": "EN"}),
        json!({"text": too_long, "language": "EN"}),
        json!({"text": "a\u{0}b", "language": "EN"}),
        json!({"text": "hi", "language": "english"}),
        json!({"text": "hi", "language": "e"}),
        json!({"text": "hi", "language": "en_US"}),
        json!(["hi", "EN"]), // the predecessor answered 500 to an array
        json!("hi"),
        json!(null),
    ];

    for body in cases {
        let response = app.post_json("/data/1/1", &body).await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        assert!(
            !problem["detail"].as_str().unwrap().contains("hi\""),
            "no echo of the text: {problem}"
        );
    }
    assert_eq!(app.stage(1, 1, "first", "EN").await, 1, "nothing was stored before");
}

#[tokio::test]
async fn the_largest_allowed_text_and_unknown_fields_are_accepted() {
    let app = spawn_app().await;
    let text = "é".repeat(16 * 1024); // exactly 32768 bytes

    let response = app
        .post_json(
            "/data/1/1",
            &json!({"text": text, "language": "pt-BR", "mood": "happy"}),
        )
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn messages_of_a_refused_dialog_are_409_consent_refused() {
    let app = spawn_app().await;
    app.stage(1, 9, "hello", "EN").await;
    assert_eq!(app.consent(9, false).await.status(), StatusCode::OK);

    let response = app
        .post_json("/data/1/9", &json!({"text": "again", "language": "EN"}))
        .await;

    assert_problem(response, StatusCode::CONFLICT, "consent_refused").await;
}

#[tokio::test]
async fn a_message_to_a_granted_dialog_answers_consent_granted() {
    let app = spawn_app().await;
    app.stage(1, 4, "before", "EN").await;
    assert_eq!(app.consent(4, true).await.status(), StatusCode::ACCEPTED);

    let response = app
        .post_json("/data/1/4", &json!({"text": "after", "language": "EN"}))
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["consent"], "granted");
    assert_eq!(body["seq"], 2);
}

/// A process asks PostgreSQL before Redis about dialogs it has not staged lately (and the
/// script creates them in the same call). A dialog that another process staged, or that
/// Redis forgot after PostgreSQL stored it, must come out exactly as without that: its
/// seq continued, its customer checked, a grant PostgreSQL holds kept.
#[tokio::test]
async fn a_process_new_to_a_dialog_continues_it_as_redis_and_postgresql_hold_it() {
    let settings = crate::helpers::test_settings();
    let first = crate::helpers::spawn_full(settings.clone()).await;
    for text in ["one", "two", "three"] {
        first.stage(1, 9, text, "EN").await;
    }
    first.stage(1, 10, "mine", "EN").await;
    first.stage(1, 11, "one", "EN").await;
    first.stage(1, 11, "two", "EN").await;
    assert!(first.consent(11, true).await.status().is_success());
    first.wait_for_seqs(11, &[1, 2]).await;
    // Redis forgets dialog 11; PostgreSQL holds it as granted up to seq 2.
    first.forget(11).await;

    let second = crate::helpers::spawn_api_only(settings).await;
    assert_eq!(second.stage(1, 9, "four", "EN").await, 4, "Redis's seq continues");
    let response = second
        .post_json("/data/2/10", &json!({"text": "theirs", "language": "EN"}))
        .await;
    assert_problem(response, StatusCode::CONFLICT, "customer_mismatch").await;
    let response = second
        .post_json("/data/1/11", &json!({"text": "three", "language": "EN"}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["seq"], 3, "PostgreSQL's seq continues: {body}");
    assert_eq!(body["consent"], "granted", "{body}");
    first.wait_for_seqs(11, &[1, 2, 3]).await;
    assert_eq!(second.stage(1, 12, "new", "EN").await, 1);
    assert_eq!(second.stage(1, 12, "again", "EN").await, 2);
}

#[tokio::test]
async fn single_posts_cut_off_from_redis_together_answer_truthfully_and_retries_store_each_once() {
    // dapi's Redis connection goes through a proxy that cuts it right after the first
    // script call's answer. 60 single POSTs (10 known dialogs, each message with a
    // messageId) are sent at once: the first call carries the first arrivals, the rest
    // wait for the next call (one call in flight, `staging::coalesce`), which is cut.
    let mut settings = crate::helpers::test_settings();
    let proxy = crate::harness::Proxy::start(crate::harness::upstream_of(&settings.redis_url)).await;
    settings.redis_url = crate::harness::through(&settings.redis_url, proxy.addr);
    let app = crate::helpers::spawn_api_only(settings).await;
    for dialog in 40..50 {
        app.stage(1, dialog, "known", "EN").await;
    }
    let path = |i: usize| format!("/data/1/{}", 40 + i % 10);
    let body = |i: usize| json!({"text": format!("m{i}"), "language": "EN", "messageId": format!("id-{i}")});

    proxy.cut_after_answers(1);
    let requests: Vec<(String, Value)> = (0..60).map(|i| (path(i), body(i))).collect();
    let first = join_all(requests.iter().map(|(path, body)| app.post_json(path, body))).await;

    // Each answer is a 202 or a 503, none a 500; both kinds occur.
    let mut accepted = std::collections::HashMap::new();
    let mut refused = 0;
    for (i, answer) in first.into_iter().enumerate() {
        match answer.status() {
            StatusCode::ACCEPTED => {
                let answer: Value = answer.json().await.unwrap();
                accepted.insert(i, answer["seq"].as_i64().unwrap());
            }
            _ => {
                assert_problem(answer, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;
                refused += 1;
            }
        }
    }
    assert!(
        !accepted.is_empty() && refused > 0,
        "{} accepted, {refused} refused",
        accepted.len()
    );

    // The retry of all 60: a 202 of the first round was staged (a duplicate now, same
    // seq); every message is stored exactly once.
    proxy.restore();
    let mut seqs = vec![Vec::new(); 10];
    for i in 0..60 {
        let answer: Value = crate::helpers::wait_until(std::time::Duration::from_secs(20), async || {
            let answer = app.post_json(&path(i), &body(i)).await;
            match answer.status() {
                StatusCode::ACCEPTED => Ok(answer.json().await.unwrap()),
                status => Err(format!("the retry answered {status}")),
            }
        })
        .await;
        let seq = answer["seq"].as_i64().unwrap();
        if let Some(&first_seq) = accepted.get(&i) {
            assert_eq!(
                (seq, answer["duplicate"].as_bool()),
                (first_seq, Some(true)),
                "message {i}"
            );
        }
        seqs[i % 10].push(seq);
    }
    for (k, mut got) in seqs.into_iter().enumerate() {
        got.sort_unstable();
        assert_eq!(got, (2..=7).collect::<Vec<i64>>(), "dialog {}", 40 + k);
        assert_eq!(app.staged_len(40 + k as i64).await, 7, "dialog {}", 40 + k);
    }
}
