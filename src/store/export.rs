//! The reads behind `GET /data/export`: the export epochs and the two orders an export
//! streams in (docs/design.md, "The export's order").
//!
//! Every message carries `export_epoch`, the epoch current when the transaction that
//! stored it ran. A transaction that inserts messages takes the export's advisory lock
//! shared as its first statement and holds it until it commits; [`Store::close_export_epoch`]
//! takes it exclusively, which waits for every such transaction to end, and increments
//! the epoch before releasing it. So once an export has closed epoch `e` (the current
//! one becomes `e + 1`), every message of an epoch up to `e` is committed, and none can
//! be added to them later, whatever order concurrent flushes commit in: a flush that
//! starts after the close waits for it and writes `e + 1`.
//!
//! A fresh export streams the messages of every closed epoch in `receivedAt` order
//! (the window); a resumed one streams the epochs closed since, in (epoch, receivedAt)
//! order: a dialog received on Monday and consented on Wednesday is in Wednesday's
//! epoch, delivered by the first sync after its flush.

use sqlx::Postgres;
use time::OffsetDateTime;

use super::sql::{
    CLOSE_EPOCH, EXPORT_EPOCHS, EXPORT_EXCLUSIVE, EXPORT_WINDOW_ALL, EXPORT_WINDOW_BY_CUSTOMER,
    EXPORT_WINDOW_BY_CUSTOMER_LANGUAGE, EXPORT_WINDOW_BY_LANGUAGE,
};
use super::{EARLIEST, Filter, Store, StoreError, StoredMessage, bound_time, micros_of};
use crate::domain::CustomerId;

/// Where an export stands: what it has delivered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportPosition {
    /// A fresh export: every message of the epochs before `below`, in `receivedAt` order;
    /// those up to `at` are delivered.
    Window { below: i64, at: MessageKey },
    /// Every message of the epochs before `epoch` is delivered, and of `epoch` those up
    /// to `at` (in `receivedAt` order).
    Epochs { epoch: i64, at: MessageKey },
}

/// A message's place in `receivedAt` order: (receivedAt in µs, dialog, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageKey {
    pub received_at_us: i64,
    pub dialog_id: i64,
    pub seq: i64,
}

impl MessageKey {
    /// Before every message.
    pub const START: MessageKey = MessageKey {
        received_at_us: i64::MIN,
        dialog_id: -1,
        seq: -1,
    };

    fn of(m: &StoredMessage) -> Self {
        MessageKey {
            received_at_us: micros_of(m.received_at),
            dialog_id: m.dialog_id,
            seq: m.seq,
        }
    }

    fn time(&self) -> OffsetDateTime {
        if self.received_at_us == i64::MIN {
            EARLIEST
        } else {
            bound_time(self.received_at_us)
        }
    }
}

/// A message of an export, with its epoch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    #[sqlx(flatten)]
    pub message: StoredMessage,
    pub export_epoch: i64,
}

impl ExportPosition {
    /// Where an export stands after `row`, sent from this position.
    pub fn after(&self, row: &ExportRow) -> ExportPosition {
        let at = MessageKey::of(&row.message);
        match *self {
            ExportPosition::Window { below, .. } => ExportPosition::Window { below, at },
            ExportPosition::Epochs { .. } => ExportPosition::Epochs {
                epoch: row.export_epoch,
                at,
            },
        }
    }
}

impl Store {
    /// Closes the current export epoch: waits for every transaction writing it to
    /// commit, then makes the next one current. Answers the new current epoch: every
    /// message of an older one is committed, on the primary. With a read replica, also
    /// waits (up to `replica_wait`) until the replica has replayed that far.
    pub async fn close_export_epoch(&self, replica_wait: std::time::Duration) -> Result<i64, StoreError> {
        let mut tx: sqlx::Transaction<'_, Postgres> = self.pool.begin().await?;
        sqlx::query(EXPORT_EXCLUSIVE).execute(&mut *tx).await?;
        let epoch: i64 = sqlx::query_scalar(CLOSE_EPOCH).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        // A replica that has not replayed the close in time cannot serve this export yet:
        // unavailable for now (503), as a read of a replica that lags.
        self.wait_for_replica(replica_wait).await.map_err(|e| match e {
            StoreError::ReplicaBehind => StoreError::Unavailable(sqlx::Error::PoolTimedOut),
            other => other,
        })?;
        Ok(epoch)
    }

    /// Up to `limit` messages after `from`, of the epochs before `upto` (for a window:
    /// before its own `below`), matching `filter`, in the export's order. Fewer than
    /// `limit` means that the window, or the epochs up to `upto`, are done. One
    /// statement, its own snapshot: a refusal's erasure committed before it leaves
    /// nothing of its dialog to read.
    pub async fn export_step(
        &self,
        filter: &Filter,
        from: &ExportPosition,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<ExportRow>, StoreError> {
        let (lower, upper) = (filter.range.lower(), filter.range.upper());
        let customer = filter.customer.map(CustomerId::get);
        match *from {
            ExportPosition::Window { below, at } => {
                let statement = match (&filter.language, customer) {
                    (None, None) => EXPORT_WINDOW_ALL,
                    (Some(_), None) => EXPORT_WINDOW_BY_LANGUAGE,
                    (None, Some(_)) => EXPORT_WINDOW_BY_CUSTOMER,
                    (Some(_), Some(_)) => EXPORT_WINDOW_BY_CUSTOMER_LANGUAGE,
                };
                let mut query = sqlx::query_as(statement)
                    .persistent(false)
                    .bind(limit)
                    .bind(below)
                    .bind(at.time())
                    .bind(at.dialog_id)
                    .bind(at.seq)
                    .bind(lower)
                    .bind(upper);
                if let Some(language) = &filter.language {
                    query = query.bind(language);
                }
                if let Some(customer) = customer {
                    query = query.bind(customer);
                }
                query.fetch_all(self.reads()).await.map_err(|e| self.read_error(e))
            }
            ExportPosition::Epochs { epoch, at } => sqlx::query_as(EXPORT_EPOCHS)
                .persistent(false)
                .bind(limit)
                .bind(upto)
                .bind(epoch)
                .bind(at.time())
                .bind(at.dialog_id)
                .bind(at.seq)
                .bind(lower)
                .bind(upper)
                .bind(filter.language.as_deref())
                .bind(customer)
                .fetch_all(self.reads())
                .await
                .map_err(|e| self.read_error(e)),
        }
    }
}
