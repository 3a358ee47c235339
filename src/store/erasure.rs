//! Erasing a customer, and proving it: the receipts (`erasures`), the audit trail
//! (`consent_events`) and the per-batch erasure of a customer's dialogs. The workflow
//! that drives them, across Redis and PostgreSQL, is `crate::erasure`.
//!
//! Every statement is a key lookup or an index range, in its generic plan too (`sql`'s
//! "Plans"): an erasure costs what the customer's own data costs.

use std::collections::{BTreeSet, HashMap, HashSet};

use sqlx::Postgres;
use time::OffsetDateTime;
use uuid::Uuid;

use super::sql::{
    ADOPT_ERASURE, AUDIT_ALL, AUDIT_BY_CUSTOMER, AUDIT_BY_CUSTOMER_DIALOG, AUDIT_BY_DIALOG, BEGIN_ERASURE,
    COMPLETE_ERASURE, CUSTOMER_DIALOGS, DIALOG_STATUS, ERASE_DIALOGS_ROWS, ERASURE, ERASURE_EVENTS_WRITTEN,
    PENDING_ERASURE_OF, PENDING_ERASURES, RECORD_ERASURE_PROGRESS, UPSERT_DIALOGS, WRITE_EVENTS,
};
use super::{Store, StoreError, micros_of, time_of};
use crate::domain::{CustomerId, Decision, DialogId};

/// An erasure receipt, pending or completed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Receipt {
    pub erasure_id: Uuid,
    pub customer_id: i64,
    pub status: String,
    pub dialogs: i64,
    pub messages: i64,
    pub requested_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
}

impl Receipt {
    pub fn is_completed(&self) -> bool {
        self.status == "completed"
    }
}

/// One dialog an erasure has refused in Redis, to be erased in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedForErasure {
    pub dialog: DialogId,
    /// The refusal's epoch and time, as Redis recorded them.
    pub epoch: i64,
    pub decided_at_us: i64,
    /// The seqs of the staged messages the refusal deleted from Redis (quarantined copies
    /// included): counted with PostgreSQL's, each (dialog, seq) once.
    pub staged_seqs: Vec<i64>,
    /// A grant of the dialog whose audit event no flush had written when the erasure's
    /// refusal overtook it: written before the refusal's own.
    pub unwritten_grant: Option<crate::domain::GrantToAudit>,
}

/// One audit event to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: OffsetDateTime,
    pub event: &'static str,
    pub customer: Option<i64>,
    pub dialog: Option<i64>,
    pub messages: Option<i64>,
    pub erasure: Option<Uuid>,
}

/// One audit event as `GET /audit` answers it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditEvent {
    pub event_id: i64,
    pub at: OffsetDateTime,
    pub event: String,
    pub customer_id: Option<i64>,
    pub dialog_id: Option<i64>,
    pub messages: Option<i64>,
    pub erasure_id: Option<Uuid>,
}

/// Where a dialog stands in PostgreSQL (`GET /consents/{dialogId}`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredStatus {
    pub customer_id: i64,
    pub decision: String,
    pub decided_at: OffsetDateTime,
    pub last_seq: i64,
    pub erased_at: Option<OffsetDateTime>,
    /// Messages stored (readable when the decision is a grant).
    pub stored: i64,
}

/// Writes `events` in the transaction `tx`.
pub(super) async fn write_events(tx: &mut sqlx::Transaction<'_, Postgres>, events: &[Event]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(WRITE_EVENTS)
        .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.event).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.customer).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.dialog).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.messages).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.erasure).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// Records the erasure of `customer` as pending, or finds the one pending already
    /// (a repeated DELETE answers the same receipt). `id` and `requested_at` are the new
    /// erasure's, if one is made.
    pub async fn begin_erasure(
        &self,
        customer: CustomerId,
        id: Uuid,
        requested_at: OffsetDateTime,
    ) -> Result<Receipt, StoreError> {
        // The pending erasure found may complete between the two statements: then the
        // insert is tried again (a few times; each try either inserts or finds one).
        for _ in 0..5 {
            let made: Option<Receipt> = sqlx::query_as(BEGIN_ERASURE)
                .bind(id)
                .bind(customer.get())
                .bind(requested_at)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(receipt) = made {
                return Ok(receipt);
            }
            let pending: Option<Receipt> = sqlx::query_as(PENDING_ERASURE_OF)
                .bind(customer.get())
                .fetch_optional(&self.pool)
                .await?;
            if let Some(receipt) = pending {
                return Ok(receipt);
            }
        }
        Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
    }

    /// Records an erasure that Redis kept while PostgreSQL was away (a no-op when
    /// PostgreSQL holds it already, or another erasure of the customer is pending).
    pub async fn adopt_erasure(
        &self,
        id: Uuid,
        customer: CustomerId,
        requested_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(ADOPT_ERASURE)
            .bind(id)
            .bind(customer.get())
            .bind(requested_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The receipt of erasure `id`, if dapi issued it.
    pub async fn receipt(&self, id: Uuid) -> Result<Option<Receipt>, StoreError> {
        Ok(sqlx::query_as(ERASURE).bind(id).fetch_optional(&self.pool).await?)
    }

    /// Every pending erasure (for the loop that finishes them).
    pub async fn pending_erasures(&self) -> Result<Vec<Receipt>, StoreError> {
        Ok(sqlx::query_as(PENDING_ERASURES).fetch_all(&self.pool).await?)
    }

    /// Up to `limit` dialogs PostgreSQL holds of `customer`, after `after` in id order.
    pub async fn customer_dialogs(
        &self,
        customer: CustomerId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DialogId>, StoreError> {
        let ids: Vec<i64> = sqlx::query_scalar(CUSTOMER_DIALOGS)
            .persistent(false)
            .bind(customer.get())
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().map(DialogId::from_stored).collect())
    }

    /// Erases, in one transaction, dialogs of `receipt`'s customer that the erasure has
    /// refused in Redis: each refusal is written under the epoch fence, every stored
    /// message of the dialogs whose refusal took is deleted (every partition, counts
    /// adjusted), a `refused` event is written per dialog (once per erasure, however
    /// often this runs again after a crash), and the receipt's counts grow by what was
    /// removed. Returns the receipt's new (dialogs, messages).
    pub async fn erase_for(&self, receipt: &Receipt, refused: &[RefusedForErasure]) -> Result<(i64, i64), StoreError> {
        let mut tx = self.pool.begin_with(super::sql::BEGIN_ERASING).await?;
        let mut refused: Vec<&RefusedForErasure> = refused.iter().collect();
        refused.sort_by_key(|r| r.dialog);
        refused.dedup_by_key(|r| r.dialog);
        let took: Vec<i64> = sqlx::query_scalar(UPSERT_DIALOGS)
            .bind(refused.iter().map(|r| r.dialog.get()).collect::<Vec<_>>())
            .bind(vec![receipt.customer_id; refused.len()])
            .bind(vec![Decision::Refused.as_str(); refused.len()])
            .bind(refused.iter().map(|r| r.epoch).collect::<Vec<_>>())
            .bind(refused.iter().map(|r| time_of(r.decided_at_us)).collect::<Vec<_>>())
            .bind(vec![0_i64; refused.len()])
            .fetch_all(&mut *tx)
            .await?;
        let rows: Vec<(i64, i64)> = sqlx::query_as(ERASE_DIALOGS_ROWS)
            .persistent(false)
            .bind(&took)
            .bind(super::next_counter_shard())
            .fetch_all(&mut *tx)
            .await?;
        let mut removed: HashMap<i64, BTreeSet<i64>> = HashMap::new();
        for (dialog, seq) in rows {
            removed.entry(dialog).or_default().insert(seq);
        }
        for r in &refused {
            removed.entry(r.dialog.get()).or_default().extend(&r.staged_seqs);
        }
        // One event per dialog per erasure: a run again after a crash writes none twice.
        let written: HashSet<i64> = sqlx::query_scalar::<_, i64>(ERASURE_EVENTS_WRITTEN)
            .persistent(false)
            .bind(receipt.erasure_id)
            .bind(refused.iter().map(|r| r.dialog.get()).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        // A grant the erasure overtook before any flush wrote its event is written here
        // (a flush that did write it holds the same (dialog, kind, time): not twice).
        let events: Vec<Event> = refused
            .iter()
            .filter(|r| !written.contains(&r.dialog.get()))
            .flat_map(|r| {
                let grant = r.unwritten_grant.map(|g| Event {
                    at: time_of(g.decided_at_us),
                    event: "granted",
                    customer: Some(receipt.customer_id),
                    dialog: Some(r.dialog.get()),
                    messages: None,
                    erasure: None,
                });
                grant.into_iter().chain(std::iter::once(Event {
                    at: time_of(r.decided_at_us),
                    event: "refused",
                    customer: Some(receipt.customer_id),
                    dialog: Some(r.dialog.get()),
                    messages: Some(removed.get(&r.dialog.get()).map_or(0, |s| s.len() as i64)),
                    erasure: Some(receipt.erasure_id),
                }))
            })
            .collect();
        write_events(&mut tx, &events).await?;
        // A dialog whose event this erasure wrote already was counted by the transaction
        // that wrote it (a run again after a crash between that commit and Redis's
        // confirmation gets its deleted seqs from Redis once more: not counted twice).
        removed.retain(|dialog, _| !written.contains(dialog));
        let dialogs = removed.values().filter(|s| !s.is_empty()).count() as i64;
        let messages: i64 = removed.values().map(|s| s.len() as i64).sum();
        let totals: (i64, i64) = sqlx::query_as(RECORD_ERASURE_PROGRESS)
            .bind(receipt.erasure_id)
            .bind(dialogs)
            .bind(messages)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(totals)
    }

    /// Marks erasure `id` completed and writes its `customer_erased` event, in one
    /// transaction. Returns the completed receipt.
    pub async fn complete_erasure(&self, id: Uuid) -> Result<Receipt, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done: Option<Receipt> = sqlx::query_as(COMPLETE_ERASURE)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let receipt = match done {
            Some(receipt) => {
                let event = Event {
                    at: receipt.completed_at.unwrap_or_else(OffsetDateTime::now_utc),
                    event: "customer_erased",
                    customer: Some(receipt.customer_id),
                    dialog: None,
                    messages: Some(receipt.messages),
                    erasure: Some(receipt.erasure_id),
                };
                write_events(&mut tx, &[event]).await?;
                receipt
            }
            // Completed already (by another process).
            None => sqlx::query_as(ERASURE).bind(id).fetch_one(&mut *tx).await?,
        };
        tx.commit().await?;
        Ok(receipt)
    }

    /// Where `dialog` stands in PostgreSQL, if it holds a decision of it.
    pub async fn stored_status(&self, dialog: DialogId) -> Result<Option<StoredStatus>, StoreError> {
        Ok(sqlx::query_as(DIALOG_STATUS)
            .persistent(false)
            .bind(dialog.get())
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A page of the audit trail, newest first, after `cursor` (at µs, event id).
    pub async fn audit_page(
        &self,
        customer: Option<CustomerId>,
        dialog: Option<DialogId>,
        cursor: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let (at, id) = match cursor {
            Some((at, id)) => (time_of(at), id),
            None => (time::macros::datetime!(9999-12-31 23:59:59 UTC), i64::MAX),
        };
        let statement = match (customer, dialog) {
            (None, None) => AUDIT_ALL,
            (Some(_), None) => AUDIT_BY_CUSTOMER,
            (None, Some(_)) => AUDIT_BY_DIALOG,
            (Some(_), Some(_)) => AUDIT_BY_CUSTOMER_DIALOG,
        };
        let mut query = sqlx::query_as(statement)
            .persistent(false)
            .bind(limit)
            .bind(at)
            .bind(id);
        // `$4` the customer, then `$4` or `$5` the dialog.
        if let Some(customer) = customer {
            query = query.bind(customer.get());
        }
        if let Some(dialog) = dialog {
            query = query.bind(dialog.get());
        }
        Ok(query.fetch_all(&self.pool).await?)
    }
}

/// The position that continues after `event` in the audit trail.
pub fn audit_position(event: &AuditEvent) -> (i64, i64) {
    (micros_of(event.at), event.event_id)
}
