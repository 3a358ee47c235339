//! What operators see: metrics, the OpenAPI document, request ids.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_show_the_flush_queue() {
    let app = spawn_app().await;
    app.stage(1, 77, "hi", "EN").await;
    app.consent(77, true).await;
    app.wait_for_seqs(77, &[1]).await;
    let _ = app.get("/no/such/route/123").await;

    let response = app.get("/metrics").await;

    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for expected in [
        r#"dapi_http_requests_total{route="/data/{customerId}/{dialogId}",method="POST",status="202"}"#,
        r#"route="unmatched""#,
        "dapi_http_request_duration_seconds_bucket",
        "dapi_staged_messages_total",
        "dapi_flushed_messages_total",
        "dapi_flush_batch_duration_seconds_bucket",
        "dapi_flush_queue_length",
        "dapi_flush_queue_pending",
        "dapi_flush_queue_oldest_age_seconds",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    assert!(!text.contains("/data/1/77"), "raw paths never become labels");
}

/// The API as docs/api.md describes it: every operation, by method and path template.
const OPERATIONS: [(&str, &str); 13] = [
    ("post", "/data/{customerId}/{dialogId}"),
    ("post", "/data"),
    ("post", "/consents/{dialogId}"),
    ("get", "/consents/{dialogId}"),
    ("delete", "/customers/{customerId}"),
    ("get", "/erasures/{erasureId}"),
    ("get", "/audit"),
    ("get", "/data"),
    ("get", "/data/export"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[tokio::test]
async fn the_openapi_document_describes_every_route_that_is_served() {
    let app = spawn_app().await;

    let document: Value = app.get_json("/openapi.json").await;

    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();
    let mut documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    documented.sort();
    let mut expected: Vec<(String, String)> = OPERATIONS.iter().map(|(m, p)| ((*m).into(), (*p).into())).collect();
    expected.sort();
    assert_eq!(documented, expected);
    // Routes are registered only through the document's own router (`http::routes`), so
    // what is served and what is described are one list; each of them answers.
    for (method, path) in OPERATIONS {
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{customerId}", "1")
                .replace("{dialogId}", "1")
                .replace("{erasureId}", "0193a7c2-5b1e-7c3d-9a40-2f6f1d3c8e11")
        );
        let request = match method {
            "post" => app.http.post(url).json(&serde_json::json!(true)),
            "delete" => app.http.delete(url),
            _ => app.http.get(url),
        };
        let response = request.send().await.unwrap();
        assert_ne!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        let body = response.text().await.unwrap();
        assert!(
            !body.contains("\"not_found\""),
            "{method} {path} is documented but not served"
        );
    }
    let problem = &document["components"]["schemas"]["Problem"];
    assert!(problem["properties"]["code"].is_object(), "{problem}");
}

#[tokio::test]
async fn the_document_can_be_browsed_at_docs() {
    let app = spawn_app().await;

    let page = app.get("/docs/").await;

    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("swagger"));
}

#[tokio::test]
async fn every_answer_carries_a_request_id_taken_from_the_client_when_sensible() {
    let app = spawn_app().await;

    let given = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    let made = app.get("/data/").await;
    let odd = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "a b<c>")
        .send()
        .await
        .unwrap();

    assert_eq!(given.headers()["x-request-id"], "abc-123");
    let made_id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!made_id.is_empty() && made_id != "-");
    assert_ne!(odd.headers()["x-request-id"], "a b<c>");
}
