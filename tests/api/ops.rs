//! Operations endpoints, unknown routes, and answers while Redis is away.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_api_only, spawn_app, test_settings};

#[tokio::test]
async fn healthz_and_readyz_answer_200_when_both_stores_answer() {
    let app = spawn_app().await;

    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["status"], "ready");
}

#[tokio::test]
async fn without_redis_posts_are_503_with_retry_after_and_readyz_names_redis() {
    let mut settings = test_settings();
    settings.redis_url = "redis://127.0.0.1:1".into(); // nothing listens there
    let app = spawn_api_only(settings).await;

    let response = app
        .post_json("/data/1/1", &json!({"text": "hi", "language": "EN"}))
        .await;
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;

    let consent = app.consent(1, true).await;
    assert_problem(consent, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;

    let ready = assert_problem(app.get("/readyz").await, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
    assert!(ready["detail"].as_str().unwrap().contains("Redis"), "{ready}");
    assert!(!ready["detail"].as_str().unwrap().contains("PostgreSQL"), "{ready}");

    // Reads need only PostgreSQL.
    let page: Value = app.get_json("/data/").await;
    assert_eq!(page["count"], 0);
}

/// A Redis that answers but does not let dapi connect as REDIS_URL says — a wrong
/// password, a database number it does not have — is one dapi cannot use: 503, never 500.
#[tokio::test]
async fn a_redis_that_refuses_the_connection_redis_url_asks_for_is_503() {
    let suite = url::Url::parse(&crate::helpers::redis_url()).unwrap();
    let mut no_such_database = suite.clone();
    no_such_database.set_path("/99");
    let mut wrong_password = suite;
    wrong_password.set_password(Some("not-the-password")).unwrap();

    for url in [no_such_database, wrong_password] {
        let mut settings = test_settings();
        settings.redis_url = url.to_string();
        settings.redis_cluster = false;
        let app = spawn_api_only(settings).await;

        let single = app
            .post_json("/data/1/1", &json!({"text": "hi", "language": "EN"}))
            .await;
        assert_problem(single, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;
        let batch = json!({"messages": [{"customerId": 1, "dialogId": 1, "text": "hi", "language": "EN"}]});
        let batch = app.post_json("/data", &batch).await;
        assert_problem(batch, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;
        let consent = app.consent(1, true).await;
        assert_problem(consent, StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable").await;
        let ready = assert_problem(app.get("/readyz").await, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
        assert_eq!(ready["detail"], "not ready: Redis does not answer", "{url}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problem_json() {
    let app = spawn_app().await;

    assert_problem(app.get("/nope").await, StatusCode::NOT_FOUND, "not_found").await;
    let delete = app.http.delete(format!("{}/data/", app.base)).send().await.unwrap();
    assert_problem(delete, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn a_graceful_stop_finishes_in_time_and_closes_the_port() {
    let mut app = spawn_app().await;
    app.stage(1, 1, "hi", "EN").await;
    app.consent(1, true).await;

    assert!(app.stop().await, "every task finished within DAPI_SHUTDOWN_TIMEOUT");

    assert!(app.http.get(format!("{}/healthz", app.base)).send().await.is_err());
}
