//! Operations endpoints: liveness and readiness. They never need a token.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// How long readiness waits for each store.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`: 200 while the process runs.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when Redis and PostgreSQL both answer, else 503 naming which not.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (redis, postgres) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.staging.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()),
    );
    let redis_up = matches!(redis, Ok(Ok(())));
    let postgres_up = matches!(postgres, Ok(Ok(())));
    let down: Vec<&str> = [("Redis", redis_up), ("PostgreSQL", postgres_up)]
        .into_iter()
        .filter_map(|(name, up)| (!up).then_some(name))
        .collect();
    if down.is_empty() {
        Ok(Json(json!({"status": "ready", "redis": "up", "postgres": "up"})))
    } else {
        Err(ApiError::NotReady(format!("{} does not answer", down.join(" and "))))
    }
}
