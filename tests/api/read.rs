//! GET /data/: filters, order, pages, cursors.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem, refusal_of, spawn_api_only, spawn_app, states_of, test_settings};

/// Stores granted dialogs straight through the store (the flusher's own write path),
/// with chosen timestamps: `(customer, dialog, seq, language, received_at_us)`.
async fn store_granted(app: &TestApp, rows: &[(i64, i64, i64, &str, i64)]) {
    app.store.apply(&states_of(rows, "")).await.unwrap();
}

fn ids(page: &Value) -> Vec<(i64, i64)> {
    page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["dialogId"].as_i64().unwrap(), m["seq"].as_i64().unwrap()))
        .collect()
}

const T: i64 = 1_795_000_000_000_000;

#[tokio::test]
async fn an_empty_store_has_one_empty_page() {
    let app = spawn_app().await;

    for path in ["/data/", "/data"] {
        let page = app.get_json(path).await;
        assert_eq!(
            page,
            serde_json::json!({"count": 0, "next": null, "previous": null, "results": []})
        );
    }
    assert_problem(app.get("/data/?page=2").await, StatusCode::NOT_FOUND, "invalid_page").await;
}

#[tokio::test]
async fn results_are_newest_first_then_by_dialog_then_seq_descending() {
    let app = spawn_app().await;
    store_granted(
        &app,
        &[
            (1, 1, 1, "EN", T),
            (1, 1, 2, "EN", T + 5),
            (1, 2, 1, "EN", T + 5),
            (1, 2, 2, "EN", T + 5),
            (1, 3, 1, "EN", T + 9),
        ],
    )
    .await;

    let page = app.get_json("/data/").await;

    assert_eq!(page["count"], 5);
    assert_eq!(ids(&page), [(3, 1), (2, 2), (2, 1), (1, 2), (1, 1)]);
    let first = &page["results"][0];
    assert_eq!(first["customerId"], 1);
    assert_eq!(first["text"], "c1 d3 s1");
    assert_eq!(first["language"], "EN");
    assert_eq!(first["receivedAt"], "2026-11-18T11:06:40.000009Z");
}

#[tokio::test]
async fn filters_combine_and_language_ignores_case() {
    let app = spawn_app().await;
    store_granted(
        &app,
        &[
            (1, 1, 1, "EN", T),
            (1, 2, 1, "de", T + 1),
            (2, 3, 1, "en", T + 2),
            (2, 4, 1, "pt-BR", T + 3),
        ],
    )
    .await;

    let by_language = app.get_json("/data/?language=en").await;
    assert_eq!(
        (by_language["count"].as_i64(), ids(&by_language)),
        (Some(2), vec![(3, 1), (1, 1)])
    );
    let upper = app.get_json("/data/?language=EN").await;
    assert_eq!(ids(&upper), vec![(3, 1), (1, 1)]);
    let by_customer = app.get_json("/data/?customerId=1").await;
    assert_eq!(
        (by_customer["count"].as_i64(), ids(&by_customer)),
        (Some(2), vec![(2, 1), (1, 1)])
    );
    let both = app.get_json("/data/?customerId=2&language=PT-br").await;
    assert_eq!((both["count"].as_i64(), ids(&both)), (Some(1), vec![(4, 1)]));
    let none = app.get_json("/data/?customerId=3").await;
    assert_eq!(none["count"], 0);
    for not_a_tag in ["english", "%00", "e%27n"] {
        let page = app.get_json(&format!("/data/?language={not_a_tag}")).await;
        assert_eq!(page["count"], 0, "{not_a_tag}");
        let step = app.get_json(&format!("/data/?cursor=&language={not_a_tag}")).await;
        assert_eq!(step["results"], serde_json::json!([]));
    }
    let empty_values_mean_no_filter = app.get_json("/data/?customerId=&language=&unknown=1").await;
    assert_eq!(empty_values_mean_no_filter["count"], 4);
}

#[tokio::test]
async fn pages_link_to_their_neighbours_keeping_the_other_parameters() {
    let app = spawn_app().await;
    let rows: Vec<(i64, i64, i64, &str, i64)> = (1..=5).map(|d| (1, d, 1, "EN", T + d)).collect();
    store_granted(&app, &rows).await;

    let first = app.get_json("/data/?pageSize=2&language=en").await;
    assert_eq!(first["count"], 5);
    assert_eq!(ids(&first), [(5, 1), (4, 1)]);
    assert_eq!(first["previous"], Value::Null);
    let next = first["next"].as_str().unwrap();
    assert_eq!(next, format!("{}/data/?language=en&page=2&pageSize=2", app.base));

    let second = app.get_json(next.trim_start_matches(&app.base)).await;
    assert_eq!(ids(&second), [(3, 1), (2, 1)]);
    assert_eq!(second["previous"], format!("{}/data/?language=en&pageSize=2", app.base));

    let third = app.get_json("/data/?pageSize=2&language=en&page=3").await;
    assert_eq!(ids(&third), [(1, 1)]);
    assert_eq!(third["next"], Value::Null);
    assert_eq!(
        third["previous"],
        format!("{}/data/?language=en&page=2&pageSize=2", app.base)
    );

    assert_problem(
        app.get("/data/?pageSize=2&page=4").await,
        StatusCode::NOT_FOUND,
        "invalid_page",
    )
    .await;
    assert_problem(app.get("/data/?page=0").await, StatusCode::NOT_FOUND, "invalid_page").await;
    assert_problem(
        app.get("/data/?page=99999999999999999999").await,
        StatusCode::NOT_FOUND,
        "invalid_page",
    )
    .await;
}

#[tokio::test]
async fn links_use_the_public_url_when_set() {
    let mut settings = test_settings();
    settings.public_url = Some("https://api.example.com".into());
    let app = spawn_api_only(settings).await;
    store_granted(&app, &[(1, 1, 1, "EN", T), (1, 2, 1, "EN", T + 1)]).await;

    let page = app.get_json("/data?pageSize=1").await;

    assert_eq!(page["next"], "https://api.example.com/data?page=2&pageSize=1");
}

#[tokio::test]
async fn bad_query_values_are_400() {
    // The predecessor answered 500 to ?customerId=abc.
    let app = spawn_app().await;

    for query in [
        "customerId=abc",
        "customerId=-1",
        "page=abc",
        "page=1.5",
        "pageSize=0",
        "pageSize=1001",
        "pageSize=x",
    ] {
        let response = app.get(&format!("/data/?{query}")).await;
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    assert_eq!(app.get("/data/?pageSize=1000").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_cursor_scan_returns_every_message_in_page_order() {
    let app = spawn_app().await;
    // 300 messages over 60 dialogs of 3 customers, with ties in receivedAt.
    let rows: Vec<(i64, i64, i64, &str, i64)> = (0..300)
        .map(|i| {
            (
                i % 3,
                100 + i / 5,
                1 + i % 5,
                if i % 2 == 0 { "EN" } else { "de" },
                T + (i / 7) * 1000,
            )
        })
        .collect();
    store_granted(&app, &rows).await;

    for filter in ["", "&language=en", "&customerId=1", "&customerId=2&language=DE"] {
        let mut paged = Vec::new();
        let first = app.get_json(&format!("/data/?pageSize=1000{filter}")).await;
        paged.extend(ids(&first));

        let mut scanned = Vec::new();
        let mut next = Some(format!("{}/data/?cursor=&pageSize=40{filter}", app.base));
        while let Some(url) = next {
            let step = app.get_json(url.trim_start_matches(&app.base)).await;
            assert!(step.get("count").is_none(), "cursor mode has no count");
            scanned.extend(ids(&step));
            next = step["next"].as_str().map(str::to_owned);
        }

        assert_eq!(scanned, paged, "filter {filter:?}");
        assert_eq!(scanned.len() as i64, first["count"].as_i64().unwrap());
    }
}

#[tokio::test]
async fn a_cursor_not_issued_by_the_service_is_400() {
    let app = spawn_app().await;

    for cursor in ["abc", "00", "1234567890", &"0".repeat(58)] {
        let response = app.get(&format!("/data/?cursor={cursor}")).await;
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_cursor").await;
    }
}

#[tokio::test]
async fn a_page_beside_a_cursor_is_400_whatever_its_value() {
    let app = spawn_app().await;

    // The case schemathesis drew (`page` < 1 is outside the documented schema) and a
    // plausible one: cursor mode has no pages, so neither may pass silently.
    for query in ["cursor=&page=-303094663", "cursor=&page=2", "page=1&cursor="] {
        let response = app.get(&format!("/data/?{query}")).await;
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
}

#[tokio::test]
async fn counts_stay_exact_through_duplicates_and_erasures() {
    let app = spawn_app().await;
    store_granted(
        &app,
        &[(1, 1, 1, "EN", T), (1, 1, 2, "EN", T + 1), (2, 2, 1, "de", T + 2)],
    )
    .await;
    // The same rows again (a flush run twice) change nothing.
    store_granted(&app, &[(1, 1, 1, "EN", T), (1, 1, 2, "EN", T + 1)]).await;
    assert_eq!(app.get_json("/data/").await["count"], 3);

    app.store.apply(&[refusal_of(1, 1, 2)]).await.unwrap();

    assert_eq!(app.get_json("/data/").await["count"], 1);
    assert_eq!(app.get_json("/data/?language=EN").await["count"], 0);
    assert_eq!(app.get_json("/data/?customerId=1").await["count"], 0);
    assert_eq!(app.get_json("/data/?customerId=2&language=de").await["count"], 1);
}
