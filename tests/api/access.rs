//! Bearer tokens: who may do what, and the refusal to run open on a network address.

use dapi::app::{self, Roles, StartError};
use dapi::config::Tokens;
use reqwest::StatusCode;
use serde_json::json;

use crate::cleanup::Cleanup;
use crate::helpers::{TestApp, assert_problem, spawn_full, test_settings};

async fn guarded() -> TestApp {
    let mut settings = test_settings();
    settings.tokens = Tokens {
        ingest: vec!["bot-token".into()],
        read: vec!["analyst-token".into()],
        privacy: vec!["officer-token".into()],
    };
    spawn_full(settings).await
}

fn message() -> serde_json::Value {
    json!({"text": "hi", "language": "EN"})
}

#[tokio::test]
async fn without_a_token_every_api_call_is_401_with_www_authenticate() {
    let app = guarded().await;

    let calls = [
        app.http.post(format!("{}/data/1/1", app.base)).json(&message()),
        app.http.post(format!("{}/consents/1", app.base)).json(&json!(true)),
        app.http.get(format!("{}/data/", app.base)),
        app.http.get(format!("{}/data/", app.base)).bearer_auth("not-a-token"),
        app.http
            .get(format!("{}/data/", app.base))
            .header("authorization", "Basic Ym90LXRva2Vu"),
    ];
    for call in calls {
        let response = call.send().await.unwrap();
        assert_eq!(
            response.headers().get("www-authenticate").map(|v| v.to_str().unwrap()),
            Some("Bearer")
        );
        let problem = assert_problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        let text = problem.to_string();
        assert!(!text.contains("not-a-token") && !text.contains("Ym90"), "{problem}");
    }
}

#[tokio::test]
async fn each_token_may_do_what_its_role_allows_and_is_403_elsewhere() {
    let app = guarded().await;
    let post = |token: &str| {
        app.http
            .post(format!("{}/data/1/1", app.base))
            .bearer_auth(token)
            .json(&message())
    };

    assert_eq!(post("bot-token").send().await.unwrap().status(), StatusCode::ACCEPTED);
    assert_problem(
        post("analyst-token").send().await.unwrap(),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let consent = app
        .http
        .post(format!("{}/consents/1", app.base))
        .bearer_auth("bot-token")
        .json(&json!(true));
    assert_eq!(consent.send().await.unwrap().status(), StatusCode::ACCEPTED);

    let read = |token: &str| app.http.get(format!("{}/data/", app.base)).bearer_auth(token);
    assert_eq!(read("analyst-token").send().await.unwrap().status(), StatusCode::OK);
    assert_problem(
        read("bot-token").send().await.unwrap(),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
}

#[tokio::test]
async fn operations_endpoints_need_no_token() {
    let app = guarded().await;

    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(app.get(path).await.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn an_open_service_refuses_a_non_loopback_address_unless_allowed() {
    let mut settings = test_settings();
    settings.bind = "0.0.0.0:0".parse().unwrap();
    let _cleanup = Cleanup::new(&settings);

    let refused = app::start(
        settings.clone(),
        Roles {
            http: true,
            flusher: false,
        },
    )
    .await;
    assert!(matches!(refused, Err(StartError::OpenOnNetwork(_))), "{refused:?}");

    settings.allow_open = true;
    let allowed = app::start(
        settings.clone(),
        Roles {
            http: true,
            flusher: false,
        },
    )
    .await
    .unwrap();
    assert!(allowed.stop().await);

    settings.allow_open = false;
    settings.tokens.ingest = vec!["t".into()];
    let with_tokens = app::start(
        settings,
        Roles {
            http: true,
            flusher: false,
        },
    )
    .await
    .unwrap();
    assert!(with_tokens.stop().await);
}

#[tokio::test]
async fn the_export_is_for_read_tokens_only() {
    let app = guarded().await;
    let export = |token: Option<&str>| {
        let request = app.http.get(format!("{}/data/export", app.base));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    };
    let response = export(Some("analyst-token")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().starts_with("{\"resume\":"));
    for token in ["bot-token", "officer-token"] {
        assert_problem(
            export(Some(token)).send().await.unwrap(),
            StatusCode::FORBIDDEN,
            "forbidden",
        )
        .await;
    }
    assert_problem(
        export(None).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
}
