//! Recording a customer's decision, for `POST /consents/{dialogId}`.
//!
//! A grant is recorded in Redis (one script call; for a dialog Redis forgot, a second
//! after asking PostgreSQL what it holds) and the flusher does the rest. A refusal is
//! recorded in Redis — from then on nothing more is flushed and new messages are refused
//! — and then erased from PostgreSQL before [`decide`] returns, under the epoch fence. If
//! PostgreSQL cannot be reached the refusal is pending ([`ConsentError::ErasurePending`]),
//! and the flush-queue entry the refusal queued makes the flusher finish the erasure once
//! it is back; until one of them confirms it, the refusal's Redis state does not expire.
//! With a read replica (`DATABASE_READ_URL`) a refusal returns once the replica has
//! replayed the erasure, waiting at most `DAPI_REPLICA_WAIT`, else
//! [`ConsentError::ReplicaBehind`].

use std::time::Duration;

use crate::domain::{Audit, CustomerId, Decision, DialogId, DialogState, Refusal};
use crate::staging::{Choice, Decided, Revival, Staging, StagingError};
use crate::store::{HeldDialog, Store, StoreError};
use crate::telemetry;

/// Why a decision was not recorded, or a refusal not (yet) done.
#[derive(Debug)]
pub enum ConsentError {
    /// Redis failed: nothing recorded.
    Staging(StagingError),
    /// Neither Redis nor PostgreSQL knows the dialog.
    DialogNotFound,
    /// PostgreSQL could not say what it holds of a dialog Redis forgot (a grant, or a
    /// refusal for a reason other than PostgreSQL being away): nothing recorded.
    Store(StoreError),
    /// The refusal is recorded in Redis, its erasure in PostgreSQL not done yet: the
    /// flusher (or the customer's erasure under way) finishes it.
    ErasurePending(StoreError),
    /// The refusal is done on the primary; the read replica has not replayed it within
    /// the wait.
    ReplicaBehind,
}

impl From<StagingError> for ConsentError {
    fn from(e: StagingError) -> Self {
        ConsentError::Staging(e)
    }
}

/// Records `approved` for `dialog`; for a refusal, erases the dialog from PostgreSQL too
/// and waits (at most `replica_wait`) for the read replica to show it.
pub async fn decide(
    staging: &Staging,
    store: &Store,
    dialog: DialogId,
    approved: bool,
    replica_wait: Duration,
) -> Result<(), ConsentError> {
    let choice = Choice::approved(approved);
    let recorded = match staging.decide(dialog, choice, None, None).await? {
        Decided::Recorded(recorded) => recorded,
        Decided::Unknown | Decided::OtherCustomer => {
            // Redis does not know the dialog; PostgreSQL may still hold a decision of it
            // (Redis lost its data): the dialog is known. Bring it back — a grant so its
            // seqs keep counting, a refusal with nothing stored — and record the decision.
            // A grant after a refusal stores only what is posted after it: the flush
            // drops what was received before the refusal PostgreSQL holds.
            let revival = match store.decided_dialog(dialog).await {
                Ok(Some(HeldDialog::Granted(granted))) => Revival::Granted(granted),
                Ok(Some(HeldDialog::Refused { customer, .. })) => Revival::Refused { customer },
                Ok(None) => return Err(ConsentError::DialogNotFound),
                // A refusal must hold even when PostgreSQL cannot say whose dialog it
                // is: record it in Redis for an unknown customer, so that it is
                // remembered and its erasure finished (`ErasurePending` below).
                Err(e) if !approved && e.is_unavailable() => Revival::Unheld {
                    customer: CustomerId::UNKNOWN,
                },
                Err(e) => return Err(ConsentError::Store(e)),
            };
            match staging.decide(dialog, choice, Some(revival), None).await? {
                Decided::Recorded(recorded) => recorded,
                Decided::Unknown | Decided::OtherCustomer => return Err(ConsentError::DialogNotFound),
            }
        }
    };
    if approved {
        return Ok(());
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
    // On a task of its own: if the caller goes away, the transaction still runs to its
    // end instead of being dropped half-way (sqlx #4393).
    let writer = store.clone();
    let applied = tokio::spawn(async move { writer.apply(&[refusal]).await })
        .await
        .unwrap_or_else(|join| Err(StoreError::Task(join)))
        .map_err(ConsentError::ErasurePending)?;
    // The customer's erasure is pending: it writes this refusal (and erases the dialog)
    // itself. Until it has, the refusal is not done: say so, and confirm nothing.
    if applied.deferred.contains(&dialog.get()) {
        return Err(ConsentError::ErasurePending(StoreError::ErasureUnderWay));
    }
    metrics::counter!(telemetry::ERASURES).increment(1);
    metrics::counter!(telemetry::ERASED_MESSAGES).increment(applied.erased);
    // The erasure is done; telling Redis only lets the dialog's keys start to expire
    // sooner. If Redis does not hear it, the flusher's entry for the refusal does it.
    if let Err(e) = staging.confirm_erasure(dialog, recorded.epoch).await {
        tracing::warn!(error = %telemetry::chain(&e), "could not confirm an erasure to Redis; the flusher will");
    }
    // With a read replica, a done refusal must not be followed by a read of the dialog
    // there (Guarantee 3): wait, bounded, until the replica shows the refusal (its epoch,
    // or a newer decision's), which committed with the erasure. Past the bound the
    // erasure is still done on the primary and the replica catches up by itself; the
    // error says so.
    match store
        .wait_for_replica_to_show(dialog, recorded.epoch, replica_wait)
        .await
    {
        Ok(()) => Ok(()),
        Err(e) => {
            if !matches!(e, StoreError::ReplicaBehind) {
                tracing::warn!(error = %telemetry::chain(&e), "could not ask the read replica how far it has replayed");
            }
            Err(ConsentError::ReplicaBehind)
        }
    }
}
