//! Bad input, systematically: arbitrary paths, bodies, content types and query strings
//! against the running app. No input may make it answer 5xx, and every rejection is a
//! 4xx problem+json answer. (The parsers themselves are fuzzed in `src/domain.rs`.)

use std::sync::OnceLock;

use proptest::prelude::*;
use reqwest::StatusCode;

use crate::helpers::{TestApp, postgres_base, redis_conn, spawn_full, test_settings};

/// One app and runtime for all cases of a test process (proptest drives cases
/// synchronously; nextest runs each test in a process of its own). A static is never
/// dropped, so its database and keys are named after the process and removed by a later
/// test once the process is gone.
fn shared() -> &'static (tokio::runtime::Runtime, TestApp) {
    static SHARED: OnceLock<(tokio::runtime::Runtime, TestApp)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = runtime.block_on(async {
            remove_leftovers_of_dead_runs().await;
            let mut settings = test_settings();
            let pid = std::process::id();
            settings.database_url = format!("{}/{FUZZ}_{pid}", postgres_base());
            settings.redis_prefix = format!("{FUZZ}_{pid}");
            spawn_full(settings).await
        });
        (runtime, app)
    })
}

const FUZZ: &str = "dapi_test_fuzz";

async fn remove_leftovers_of_dead_runs() {
    let alive = |name: &str| {
        name.rsplit('_')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let Ok(store) = dapi::store::Store::connect(&format!("{}/postgres", postgres_base())).await else {
        return;
    };
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'dapi\\_test\\_fuzz\\_%'")
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
    for name in names.iter().filter(|n| !alive(n)) {
        let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(store.pool()).await;
    }
    let mut redis = redis_conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{FUZZ}_*"))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let dead: Vec<&String> = keys
        .iter()
        .filter(|k| !alive(k.split(':').next().unwrap_or_default()))
        .collect();
    if !dead.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(dead).query_async(&mut redis).await;
    }
}

fn check(response: reqwest::Response) -> Result<(), TestCaseError> {
    let status = response.status();
    prop_assert!(!status.is_server_error(), "{status}");
    if status.is_client_error() {
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        prop_assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    }
    Ok(())
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,20}",
        "-?[0-9]{1,3}",
        "%[0-9A-F]{2}[a-z]{0,3}",
        "[ -~]{0,12}".prop_map(|s| s.replace(['/', '?', '#'], "")),
        Just("9223372036854775808".to_owned()),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<Vec<u8>>(),
        "[ -~]{0,64}".prop_map(String::into_bytes),
        (any::<Option<String>>(), any::<Option<String>>()).prop_map(|(text, language)| {
            serde_json::json!({"text": text, "language": language})
                .to_string()
                .into_bytes()
        }),
        (".{0,40}", "[A-Za-z0-9-]{0,12}").prop_map(|(text, language)| {
            serde_json::json!({"text": text, "language": language})
                .to_string()
                .into_bytes()
        }),
        prop_oneof![
            Just("true"),
            Just("false"),
            Just("null"),
            Just("[]"),
            Just("{\"approved\":\"TrUe\"}")
        ]
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(Some("application/json".to_owned())),
        Just(Some("application/json; charset=utf-8".to_owned())),
        Just(Some("text/plain".to_owned())),
        Just(None),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_post_answers_5xx(customer in segment(), dialog in segment(), body in body(), ct in content_type(), consent in any::<bool>()) {
        let (runtime, app) = shared();
        let path = if consent { format!("/consents/{dialog}") } else { format!("/data/{customer}/{dialog}") };
        let response = runtime.block_on(app.post_raw(&path, ct.as_deref(), body));
        check(response)?;
    }

    #[test]
    fn no_query_answers_5xx(pairs in proptest::collection::vec((prop_oneof![
            Just("page"), Just("pageSize"), Just("customerId"), Just("language"), Just("cursor"), Just("x")
        ], "[ -~]{0,24}"), 0..4)) {
        let (runtime, app) = shared();
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(['&', '#', ' '], "%20")))
            .collect::<Vec<_>>()
            .join("&");
        let response = runtime.block_on(app.get(&format!("/data/?{query}")));
        prop_assert_ne!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        check(response)?;
    }
}
