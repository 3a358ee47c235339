//! Answers while PostgreSQL is unreachable: a second dapi on the same Redis whose
//! PostgreSQL address leads nowhere, beside the test's own dapi whose flushers keep
//! working. (tests/api/faults.rs cuts a proxy between dapi and a store instead.)

use std::sync::Arc;
use std::time::Duration;

use dapi::http::{AppState, router};
use dapi::staging::Staging;
use dapi::store::Store;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{TestApp, assert_problem, connector, spawn_app};

/// Serves the API of `app`'s Redis prefix with a PostgreSQL that cannot be reached.
pub async fn without_postgres(app: &TestApp) -> String {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/unreachable")
        .unwrap();
    let state = AppState::new(
        Staging::new(
            connector(&app.settings),
            &app.settings.redis_prefix,
            app.settings.staging_ttl,
        )
        .unwrap(),
        Store::from_pool(pool),
        Arc::new(app.settings.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let forever = tokio_util::sync::CancellationToken::new();
    tokio::spawn(dapi::app::serve(
        listener,
        router(state),
        forever,
        Duration::from_secs(5),
    ));
    base
}

#[tokio::test]
async fn without_postgresql_ingest_and_grants_are_accepted_and_reads_are_503() {
    let app = spawn_app().await;
    let broken = without_postgres(&app).await;
    let http = &app.http;

    let staged = http
        .post(format!("{broken}/data/1/5"))
        .json(&json!({"text": "hi", "language": "EN"}))
        .send()
        .await
        .unwrap();
    assert_eq!(staged.status(), StatusCode::ACCEPTED);
    let granted = http
        .post(format!("{broken}/consents/5"))
        .json(&json!(true))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), StatusCode::ACCEPTED);

    let read = http.get(format!("{broken}/data/")).send().await.unwrap();
    assert_eq!(
        read.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_problem(read, StatusCode::SERVICE_UNAVAILABLE, "postgres_unavailable").await;
    let ready = http.get(format!("{broken}/readyz")).send().await.unwrap();
    let ready = assert_problem(ready, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
    assert!(ready["detail"].as_str().unwrap().contains("PostgreSQL"), "{ready}");

    // The message reaches PostgreSQL through the flushers that can.
    app.wait_for_seqs(5, &[1]).await;
}

#[tokio::test]
async fn a_refusal_that_cannot_reach_postgresql_is_503_holds_at_once_and_completes_by_itself() {
    let app = spawn_app().await;
    app.stage(1, 6, "granted before the outage", "EN").await;
    app.consent(6, true).await;
    app.wait_for_seqs(6, &[1]).await;
    let broken = without_postgres(&app).await;

    let refusal = app
        .http
        .post(format!("{broken}/consents/6"))
        .json(&json!(false))
        .send()
        .await
        .unwrap();

    assert_eq!(
        refusal.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_problem(refusal, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;
    // The refusal holds in Redis at once: new messages are refused.
    let later = app
        .post_json("/data/1/6", &json!({"text": "after", "language": "EN"}))
        .await;
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
    // And the erasure completes without a second call.
    app.wait_for_seqs(6, &[]).await;
    assert_eq!(app.get_json("/data/").await["count"], 0);
}

#[tokio::test]
async fn a_refusal_that_could_not_reach_postgresql_and_a_new_grant_bring_nothing_back() {
    let app = spawn_app().await;
    app.stage(1, 7, "before", "EN").await;
    app.consent(7, true).await;
    app.wait_for_seqs(7, &[1]).await;
    let broken = without_postgres(&app).await;
    let refusal = app
        .http
        .post(format!("{broken}/consents/7"))
        .json(&json!(false))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal.status(), StatusCode::SERVICE_UNAVAILABLE);

    assert_eq!(app.consent(7, true).await.status(), StatusCode::ACCEPTED);
    app.stage(1, 7, "after the new grant", "EN").await;

    app.wait_for_seqs(7, &[2]).await;
    app.wait_for_empty_queue().await;
    assert_eq!(app.stored_seqs(7).await, [2]);
}
