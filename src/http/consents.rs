//! `POST /consents/{dialogId}`: the customer's decision, read and answered here,
//! recorded (and a refusal erased) by [`crate::ingest::decide`]: 202 for a grant, 200 for
//! a refusal once it is erased, 503 `erasure_pending` while it is not.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use super::extract::{ConsentPath, JsonBody};
use super::{ApiError, AppState};
use crate::domain::parse_consent;
use crate::ingest::{self, ConsentError};

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"dialogId": 2, "approved": true}))]
pub struct ConsentAnswer {
    dialog_id: i64,
    approved: bool,
}

/// Record the customer's decision for one dialog.
///
/// A grant (202) moves every staged message of the dialog, and every later one, to
/// PostgreSQL. A refusal (200) has erased the dialog from Redis and PostgreSQL when it
/// answers, and later messages are refused. The latest decision stands.
#[utoipa::path(
    post,
    path = "/consents/{dialogId}",
    tag = "ingest",
    params(("dialogId" = i64, Path, minimum = 0, description = "0 … 9223372036854775807")),
    request_body(content = super::openapi::ConsentBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Refused and erased", body = ConsentAnswer),
        (status = 202, description = "Granted; the flusher moves the dialog to PostgreSQL", body = ConsentAnswer),
        (status = 400, description = "Malformed JSON, or a path ID that is not such an integer (`malformed_json`, `invalid_id`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not an ingest token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 404, description = "dapi knows nothing of the dialog (`dialog_not_found`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 413, description = "Body over `DAPI_MAX_BODY_BYTES` (`payload_too_large`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 422, description = "Not one of the accepted shapes (`invalid_body`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "Redis cannot be reached (nothing recorded), or a refusal cannot reach PostgreSQL yet or the read replica has not replayed its erasure within `DAPI_REPLICA_WAIT` (`erasure_pending`: it holds, it completes by itself, repeating is safe)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn decide(
    State(state): State<AppState>,
    ConsentPath { dialog }: ConsentPath,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<ConsentAnswer>), ApiError> {
    let approved = parse_consent(&body).map_err(ApiError::InvalidBody)?;
    ingest::decide(
        &state.staging,
        &state.store,
        dialog,
        approved,
        state.settings.replica_wait,
    )
    .await
    .map_err(|e| match e {
        ConsentError::Staging(e) => ApiError::from(e),
        ConsentError::DialogNotFound => ApiError::DialogNotFound,
        ConsentError::Store(e) => ApiError::from(e),
        ConsentError::ErasurePending(e) => ApiError::ErasurePending(e),
        ConsentError::ReplicaBehind => ApiError::ReplicaBehind,
    })?;
    let status = if approved { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((
        status,
        Json(ConsentAnswer {
            dialog_id: dialog.get(),
            approved,
        }),
    ))
}
