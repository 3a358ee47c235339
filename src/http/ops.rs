//! Operations endpoints: liveness, readiness, metrics, the OpenAPI document. They never
//! need a token and are not subject to the in-flight bound, so that orchestrators and
//! scrapers still get answers from a busy service.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::store::ReplicaLag;
use crate::telemetry::{
    FLUSH_QUEUE_LENGTH, FLUSH_QUEUE_OLDEST_AGE, FLUSH_QUEUE_PENDING, REPLICA_LAG_BYTES, REPLICA_LAG_SECONDS,
};

/// How long readiness waits for each store.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process runs", body = Object)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: 200 when Redis and PostgreSQL (and the read replica, if any) answer, else
/// 503 naming which not. With a replica, the answer shows its lag.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Redis and PostgreSQL answer (and the read replica, with its lag)", body = Object),
        (status = 503, description = "`not_ready`: the detail names the store that does not answer", content_type = "application/problem+json", body = super::error::Problem)
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (redis, postgres, replica) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.staging.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.replica_lag()),
    );
    let redis_up = matches!(redis, Ok(Ok(())));
    let postgres_up = matches!(postgres, Ok(Ok(())));
    let replica = replica.unwrap_or(Some(Err(crate::store::StoreError::ReplicaBehind)));
    let replica_up = !matches!(replica, Some(Err(_)));
    let down: Vec<&str> = [
        ("Redis", redis_up),
        ("PostgreSQL", postgres_up),
        ("the PostgreSQL read replica", replica_up),
    ]
    .into_iter()
    .filter_map(|(name, up)| (!up).then_some(name))
    .collect();
    if !down.is_empty() {
        let verb = if down.len() == 1 { "does" } else { "do" };
        return Err(ApiError::NotReady(format!("{} {verb} not answer", down.join(" and "))));
    }
    let mut answer = json!({"status": "ready", "redis": "up", "postgres": "up"});
    if let Some(Ok(lag)) = replica {
        record_lag(lag);
        answer["replica"] = json!({"status": "up", "lagBytes": lag.bytes, "lagSeconds": lag.seconds});
    }
    Ok(Json(answer))
}

fn record_lag(lag: ReplicaLag) {
    metrics::gauge!(REPLICA_LAG_BYTES).set(lag.bytes as f64);
    metrics::gauge!(REPLICA_LAG_SECONDS).set(lag.seconds);
}

/// Prometheus metrics in the text format. The flush-queue gauges (and the read replica's
/// lag, with one) are read at each scrape; when a store is away they keep their last
/// values.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (stats, lag) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.staging.queue_stats()),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.replica_lag()),
    );
    if let Ok(Ok(stats)) = stats {
        metrics::gauge!(FLUSH_QUEUE_LENGTH).set(stats.length as f64);
        metrics::gauge!(FLUSH_QUEUE_PENDING).set(stats.pending as f64);
        metrics::gauge!(FLUSH_QUEUE_OLDEST_AGE).set(stats.oldest_age.as_secs_f64());
    }
    if let Ok(Some(Ok(lag))) = lag {
        record_lag(lag);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::telemetry::metrics().render(),
    )
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", body = Object))
)]
pub async fn openapi(Extension(document): Extension<Arc<Value>>) -> Json<Value> {
    Json(Value::clone(&document))
}
