//! The one error type of the HTTP layer. Every failure becomes an RFC 9457
//! `application/problem+json` answer with a stable snake_case `code`; internal causes are
//! logged with their chain and never sent (no SQL, no connection string, no stack).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::Invalid;
use crate::staging::StagingError;
use crate::store::StoreError;
use crate::telemetry::chain;

/// Seconds a client is asked to wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidId(Invalid),
    #[error("the body is not well-formed JSON ({0})")]
    MalformedJson(#[source] serde_json::Error),
    #[error("the body could not be read")]
    UnreadableBody,
    #[error("the body must be JSON: send it with `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("the body's Content-Encoding is not one dapi decodes: send it as is, or as gzip or zstd")]
    UnsupportedEncoding,
    #[error("the body does not decode as its Content-Encoding says")]
    MalformedBody,
    #[error("the body's JSON names one key twice in an object; send each key once")]
    DuplicateKey,
    #[error("the body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    InvalidBody(Invalid),
    #[error("the body must be an object with a `messages` array of 1 to {max} messages")]
    InvalidBatch { max: usize },
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    InvalidCursor(Invalid),
    #[error("{0}")]
    InvalidPage(String),
    #[error("this dialog belongs to another customer; nothing was stored")]
    CustomerMismatch,
    #[error("the customer refused consent for this dialog; nothing was stored")]
    ConsentRefused,
    #[error("no dialog with this id is known: post a message to it first")]
    DialogNotFound,
    #[error("no erasure with this id: an erasureId is matched exactly as dapi issued it")]
    ErasureNotFound,
    #[error(
        "the erasure is recorded and under way: nothing more of the customer is flushed and its dialogs refuse new messages; dapi finishes it by itself (its receipt is in `erasure`; GET /erasures/{{erasureId}} follows it), and repeating this call answers the same receipt"
    )]
    CustomerErasurePending(Box<serde_json::Value>),
    #[error("no such resource; /openapi.json of a dapi serving the API lists its paths")]
    NotFound,
    #[error("this method is not allowed on this resource")]
    MethodNotAllowed,
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("this request needs `Authorization: Bearer <token>` with a valid token")]
    Unauthorized,
    #[error("this token may not do this: ingest tokens may post, read tokens may read")]
    Forbidden,
    #[error("dapi is handling as many requests as it may at once; retry shortly")]
    Overloaded,
    #[error("the request took longer than dapi allows; it may or may not have taken effect, retry to be sure")]
    Timeout,
    #[error("the staging store (Redis) cannot be reached; nothing was recorded, retry later")]
    Staging(#[source] StagingError),
    #[error("the consented store (PostgreSQL) cannot be reached; retry later")]
    Store(#[source] StoreError),
    #[error(
        "the refusal is recorded and no more messages are accepted, but PostgreSQL could not be reached to erase what it holds; dapi finishes the erasure by itself once it is back, and repeating this call is safe"
    )]
    ErasurePending(#[source] StoreError),
    #[error(
        "the refusal is recorded and erased in PostgreSQL, but the read replica has not replayed the erasure yet (DAPI_REPLICA_WAIT), so readers there may still see the dialog for a moment; it completes by itself, and repeating this call is safe"
    )]
    ReplicaBehind,
    #[error(
        "Redis recorded this, but its replicas did not confirm it in time (DAPI_REDIS_WAIT_REPLICAS), so a failover now could lose it; retrying is safe (a message: with the same messageId)"
    )]
    NotReplicated(#[source] StagingError),
}

impl From<StagingError> for ApiError {
    fn from(e: StagingError) -> Self {
        match e {
            StagingError::NotReplicated { .. } => ApiError::NotReplicated(e),
            e => ApiError::Staging(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl ApiError {
    pub(super) fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError as E;
        match self {
            E::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_id"),
            E::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            E::UnreadableBody => (StatusCode::BAD_REQUEST, "unreadable_body"),
            E::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            E::UnsupportedEncoding => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding"),
            E::MalformedBody | E::DuplicateKey => (StatusCode::BAD_REQUEST, "malformed_body"),
            E::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            E::InvalidBody(_) | E::InvalidBatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            E::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            E::InvalidCursor(_) => (StatusCode::BAD_REQUEST, "invalid_cursor"),
            E::InvalidPage(_) => (StatusCode::NOT_FOUND, "invalid_page"),
            E::CustomerMismatch => (StatusCode::CONFLICT, "customer_mismatch"),
            E::ConsentRefused => (StatusCode::CONFLICT, "consent_refused"),
            E::DialogNotFound => (StatusCode::NOT_FOUND, "dialog_not_found"),
            E::ErasureNotFound => (StatusCode::NOT_FOUND, "erasure_not_found"),
            E::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            E::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            E::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            E::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            E::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            E::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            E::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "request_timeout"),
            E::NotReplicated(_) => (StatusCode::SERVICE_UNAVAILABLE, "replication_timeout"),
            E::Staging(e) if e.is_unavailable() => (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable"),
            E::Store(e) if e.is_unavailable() => (StatusCode::SERVICE_UNAVAILABLE, "postgres_unavailable"),
            // Whatever PostgreSQL answered, the refusal holds in Redis and the flusher
            // finishes the erasure: the client's truth is "pending", never a 500.
            E::ErasurePending(_) | E::ReplicaBehind | E::CustomerErasurePending(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "erasure_pending")
            }
            E::Staging(_) | E::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Staging(_) => metrics::counter!(crate::telemetry::STORE_ERRORS, "store" => "redis").increment(1),
            ApiError::Store(_) | ApiError::ErasurePending(_) => {
                metrics::counter!(crate::telemetry::STORE_ERRORS, "store" => "postgres").increment(1);
            }
            _ => {}
        }
        let detail = self.public_detail();
        match self {
            ApiError::CustomerErasurePending(receipt) => problem_with(status, code, &detail, Some(*receipt)),
            _ => problem(status, code, &detail),
        }
    }
}

impl ApiError {
    /// The `detail` a client may see, logging what it must not: the cause of an internal
    /// error (answered without detail) or of a dependency's failure.
    pub(super) fn public_detail(&self) -> String {
        let (status, _) = self.status_and_code();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %chain(self), "request failed");
            return "an internal error occurred; it has been logged".to_owned();
        }
        match self {
            ApiError::ErasurePending(e) if !e.is_unavailable() => {
                tracing::error!(error = %chain(self), "refusal recorded; its erasure failed and is left to the flusher");
            }
            ApiError::Staging(_) | ApiError::Store(_) | ApiError::ErasurePending(_) => {
                tracing::warn!(error = %chain(self), "dependency unavailable");
            }
            ApiError::ReplicaBehind => {
                tracing::warn!("a refusal answered before the read replica replayed its erasure")
            }
            _ => {}
        }
        self.to_string()
    }
}

/// The RFC 9457 body, fields in the RFC's order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"type": "about:blank", "title": "Conflict", "status": 409, "code": "consent_refused", "detail": "the customer refused consent for this dialog; nothing was stored"}))]
pub struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    /// The erasure receipt, on `erasure_pending` answers of DELETE /customers/{customerId}.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    erasure: Option<serde_json::Value>,
}

/// Builds a problem+json answer.
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    problem_with(status, code, detail, None)
}

/// Builds a problem+json answer carrying an erasure receipt.
fn problem_with(status: StatusCode, code: &str, detail: &str, erasure: Option<serde_json::Value>) -> Response {
    let body = Problem {
        kind: "about:blank",
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        code,
        detail,
        erasure,
    };
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
