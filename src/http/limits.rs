//! Limits that protect the service: a bound on requests in flight, past which dapi
//! answers 503 at once rather than queueing without bound, and a bound on each
//! request's time. (The body limit is axum's `DefaultBodyLimit`; the header-read timeout
//! is the connection's, in `app::serve`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::ApiError;
use crate::telemetry::{HTTP_DURATION, HTTP_REQUESTS};

#[derive(Debug, Clone)]
pub struct Limits {
    in_flight: Arc<Semaphore>,
    timeout: Duration,
}

impl Limits {
    pub fn new(max_in_flight: usize, timeout: Duration) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            timeout,
        }
    }
}

/// Middleware: admit the request if there is room, and bound its time.
pub async fn bound(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let Ok(_permit) = limits.in_flight.try_acquire() else {
        return ApiError::Overloaded.into_response();
    };
    match tokio::time::timeout(limits.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Middleware: count every answer by route template, method and status, and time it.
pub async fn measure(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(HTTP_DURATION, "route" => route.clone(), "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(HTTP_REQUESTS, "route" => route, "method" => method, "status" => status).increment(1);
    response
}
