//! `POST /consents/{dialogId}`: the customer's decision.
//!
//! A grant is recorded in Redis (one script call; for a dialog Redis forgot, a second
//! after asking PostgreSQL what it holds) and the flusher does the rest. A
//! refusal is recorded in Redis — from then on nothing more is flushed and new messages
//! are refused — and then erased from PostgreSQL before the answer, under the epoch
//! fence. If PostgreSQL cannot be reached the answer is 503, and the flush-queue entry
//! the refusal queued makes the flusher finish the erasure once it is back; until one of
//! them confirms it, the refusal's Redis state does not expire. With a read replica
//! (`DATABASE_READ_URL`) the refusal answers once the replica has replayed the erasure,
//! waiting at most `DAPI_REPLICA_WAIT`, else 503 `erasure_pending`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use super::extract::{ConsentPath, JsonBody};
use super::{ApiError, AppState};
use crate::domain::{Audit, CustomerId, Decision, DialogState, Refusal, parse_consent};
use crate::staging::{Choice, Decided, Revival};
use crate::store::{HeldDialog, StoreError};
use crate::telemetry;

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
    let choice = Choice::approved(approved);
    let recorded = match state.staging.decide(dialog, choice, None, None).await? {
        Decided::Recorded(recorded) => recorded,
        Decided::Unknown | Decided::OtherCustomer => {
            // Redis does not know the dialog; PostgreSQL may still hold a decision of it
            // (Redis lost its data): the dialog is known. Bring it back — a grant so its
            // seqs keep counting, a refusal with nothing stored — and record the decision.
            // A grant after a refusal stores only what is posted after it: the flush
            // drops what was received before the refusal PostgreSQL holds.
            let revival = match state.store.decided_dialog(dialog).await {
                Ok(Some(HeldDialog::Granted(granted))) => Revival {
                    customer: granted.customer,
                    last_seq: granted.last_seq,
                    standing: Some(Decision::Granted),
                },
                Ok(Some(HeldDialog::Refused { customer, .. })) => Revival {
                    customer,
                    last_seq: 0,
                    standing: Some(Decision::Refused),
                },
                Ok(None) => return Err(ApiError::DialogNotFound),
                // A refusal must hold even when PostgreSQL cannot say whose dialog it
                // is: record it in Redis for an unknown customer, so that it is
                // remembered and its erasure finished (503 `erasure_pending` below).
                Err(e) if !approved && e.is_unavailable() => Revival {
                    customer: CustomerId::UNKNOWN,
                    last_seq: 0,
                    standing: None,
                },
                Err(e) => return Err(e.into()),
            };
            match state.staging.decide(dialog, choice, Some(revival), None).await? {
                Decided::Recorded(recorded) => recorded,
                Decided::Unknown | Decided::OtherCustomer => return Err(ApiError::DialogNotFound),
            }
        }
    };
    let answer = Json(ConsentAnswer {
        dialog_id: dialog.get(),
        approved,
    });
    if approved {
        return Ok((StatusCode::ACCEPTED, answer));
    }
    let refusal = DialogState {
        audit: Audit {
            unwritten_grant: recorded.unwritten_grant,
            erased_staged: recorded.erased_staged.clone(),
        },
        dialog,
        customer: recorded.customer,
        decision: Decision::Refused,
        epoch: recorded.epoch,
        decided_at_us: recorded.decided_at_us,
        unerased_refusal: Some(Refusal {
            epoch: recorded.epoch,
            decided_at_us: recorded.decided_at_us,
        }),
        messages: Vec::new(),
    };
    // On a task of its own: if the client goes away, the transaction still runs to its
    // end instead of being dropped half-way (sqlx #4393).
    let store = state.store.clone();
    let applied = tokio::spawn(async move { store.apply(&[refusal]).await })
        .await
        .unwrap_or_else(|join| Err(StoreError::Task(join)))
        .map_err(ApiError::ErasurePending)?;
    // The customer's erasure is pending: it writes this refusal (and erases the dialog)
    // itself. Until it has, the refusal is not done: say so, and confirm nothing.
    if applied.deferred.contains(&dialog.get()) {
        return Err(ApiError::ErasurePending(StoreError::ErasureUnderWay));
    }
    metrics::counter!(telemetry::ERASURES).increment(1);
    metrics::counter!(telemetry::ERASED_MESSAGES).increment(applied.erased);
    // The erasure is done; telling Redis only lets the dialog's keys start to expire
    // sooner. If Redis does not hear it, the flusher's entry for the refusal does it.
    if let Err(e) = state.staging.confirm_erasure(dialog, recorded.epoch).await {
        tracing::warn!(error = %telemetry::chain(&e), "could not confirm an erasure to Redis; the flusher will");
    }
    // With a read replica, a 200 must not be followed by a read of the dialog there
    // (Guarantee 3): wait, bounded, until the replica shows the refusal (its epoch, or a
    // newer decision's), which committed with the erasure. Past the bound the erasure is
    // still done on the primary and the replica catches up by itself; the answer says so
    // (503 `erasure_pending`).
    match state
        .store
        .wait_for_replica_to_show(dialog, recorded.epoch, state.settings.replica_wait)
        .await
    {
        Ok(()) => Ok((StatusCode::OK, answer)),
        Err(e) => {
            if !matches!(e, StoreError::ReplicaBehind) {
                tracing::warn!(error = %telemetry::chain(&e), "could not ask the read replica how far it has replayed");
            }
            Err(ApiError::ReplicaBehind)
        }
    }
}
