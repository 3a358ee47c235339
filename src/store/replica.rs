//! The read replica (`DATABASE_READ_URL`): waiting until it shows what the primary
//! committed, and its lag for `/metrics`.

use std::time::Duration;

use super::{Store, StoreError, sql};
use crate::domain::DialogId;

/// How far the read replica is behind (see [`Store::replica_lag`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaLag {
    pub bytes: i64,
    pub seconds: f64,
}

impl Store {
    /// Waits until the read replica has replayed everything committed on the primary
    /// before this call (at start: the database's creation and migrations), checking
    /// every 10 ms for at most
    /// `bound`: `Err(ReplicaBehind)` past it. At once `Ok` without a replica, or when
    /// the read URL is not in recovery (not a replica at all).
    pub async fn wait_for_replica(&self, bound: Duration) -> Result<(), StoreError> {
        let Some(replica) = &self.replica else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + bound;
        let written: String = sqlx::query_scalar(sql::WAL_WRITTEN).fetch_one(&self.pool).await?;
        loop {
            let replayed: Option<bool> = sqlx::query_scalar(sql::WAL_REPLAYED)
                .bind(&written)
                .fetch_one(replica)
                .await?;
            if replayed != Some(false) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::ReplicaBehind);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the read server shows `dialog` decided at `epoch` or later — the
    /// refusal whose erasure committed in the same transaction, or a newer decision — so
    /// that it no longer shows what the refusal erased. Checked every 10 ms for at most
    /// `bound`: `Err(ReplicaBehind)` past it. At once `Ok` without a replica. Asking the
    /// read server about the dialog itself (rather than comparing WAL positions) holds
    /// whatever it is: a streaming replica, one since promoted, a logical subscriber.
    pub async fn wait_for_replica_to_show(
        &self,
        dialog: DialogId,
        epoch: i64,
        bound: Duration,
    ) -> Result<(), StoreError> {
        let Some(replica) = &self.replica else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let shown: Option<i64> = sqlx::query_scalar(sql::DIALOG_EPOCH)
                .persistent(false)
                .bind(dialog.get())
                .fetch_optional(replica)
                .await
                .map_err(|e| self.read_error(e))?;
            if shown.is_some_and(|shown| shown >= epoch) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::ReplicaBehind);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`Store::wait_for_replica`] for a replica that may not even have the database yet
    /// (at start, right after the primary created and migrated it): any error counts as
    /// "not yet" until `bound` has passed.
    pub async fn replica_caught_up(&self, bound: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.wait_for_replica(left).await {
                Err(e) if !left.is_zero() && !matches!(e, StoreError::ReplicaBehind) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// The read replica's state for `/readyz` and `/metrics`: `None` without one;
    /// else how far its replay is behind the primary, in bytes of WAL and in time since
    /// the last transaction it replayed (0 when it has replayed everything).
    pub async fn replica_lag(&self) -> Option<Result<ReplicaLag, StoreError>> {
        let replica = self.replica.as_ref()?;
        Some(
            async {
                let written: String = sqlx::query_scalar(sql::WAL_WRITTEN).fetch_one(&self.pool).await?;
                let (bytes, seconds): (Option<i64>, Option<f64>) = sqlx::query_as(sql::REPLICA_LAG)
                    .bind(&written)
                    .fetch_one(replica)
                    .await?;
                Ok(ReplicaLag {
                    bytes: bytes.unwrap_or(0).max(0),
                    seconds: if bytes.unwrap_or(0) > 0 {
                        seconds.unwrap_or(0.0).max(0.0)
                    } else {
                        0.0
                    },
                })
            }
            .await,
        )
    }
}
