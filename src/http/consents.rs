//! `POST /consents/{dialogId}`: the customer's decision.
//!
//! A grant is recorded in Redis (one script call) and the flusher does the rest. A
//! refusal is recorded in Redis — from then on nothing more is flushed and new messages
//! are refused — and then erased from PostgreSQL before the answer, under the epoch
//! fence. If PostgreSQL cannot be reached the answer is 503, and the flush-queue entry
//! the refusal queued makes the flusher finish the erasure once it is back.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use super::extract::{ConsentPath, JsonBody};
use super::{ApiError, AppState};
use crate::domain::{Decision, DialogState, parse_consent};
use crate::staging::Revival;
use crate::store::StoreError;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentAnswer {
    dialog_id: i64,
    approved: bool,
}

pub async fn decide(
    State(state): State<AppState>,
    ConsentPath { dialog }: ConsentPath,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<ConsentAnswer>), ApiError> {
    let approved = parse_consent(&body).map_err(ApiError::InvalidBody)?;
    let recorded = match state.staging.decide(dialog, approved, None).await? {
        Some(recorded) => recorded,
        None => {
            // Redis does not know the dialog; PostgreSQL may still hold it as granted
            // (Redis lost its data). Bring it back so its seqs keep counting.
            let (customer, last_seq) = state
                .store
                .granted_dialog(dialog)
                .await?
                .ok_or(ApiError::DialogNotFound)?;
            let revival = Revival { customer, last_seq };
            state
                .staging
                .decide(dialog, approved, Some(revival))
                .await?
                .ok_or(ApiError::DialogNotFound)?
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
        dialog,
        customer: recorded.customer,
        decision: Decision::Refused,
        epoch: recorded.epoch,
        decided_at_us: recorded.decided_at_us,
        erased_through: recorded.erased_through,
        messages: Vec::new(),
    };
    // On a task of its own: if the client goes away, the transaction still runs to its
    // end instead of being dropped half-way (sqlx #4393).
    let store = state.store.clone();
    tokio::spawn(async move { store.apply(&[refusal]).await })
        .await
        .unwrap_or_else(|join| Err(StoreError::Task(join)))
        .map_err(ApiError::ErasurePending)?;
    Ok((StatusCode::OK, answer))
}
