//! Limits that protect the service: a bound on requests in flight, past which dapi
//! answers 503 at once rather than queueing without bound, and a bound on each
//! request's time. (The body limit is axum's `DefaultBodyLimit`; the header-read timeout
//! is the connection's, in `app::serve`.)

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::ApiError;
use super::access::{Access, Role};

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

/// What guards a group of API routes: the limits and the role its token must have.
#[derive(Debug, Clone)]
pub struct Guard {
    pub limits: Limits,
    pub access: Access,
    pub role: Role,
}

/// Middleware (one per request, for speed): admit the request if there is room, check
/// its token, and bound its time.
pub async fn guard(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let Ok(_permit) = guard.limits.in_flight.try_acquire() else {
        return ApiError::Overloaded.into_response();
    };
    let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match guard.access.check(guard.role, authorization) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
        }
        Err(denied) => return denied.into_response(),
    }
    match tokio::time::timeout(guard.limits.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}
