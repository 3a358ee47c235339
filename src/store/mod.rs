//! The consented store in PostgreSQL: embedded migrations and the one handle
//! ([`Store`]); the batch write that the flusher and the refusal handler share
//! (`write.rs`), the reads behind GET /data and the ingest path's lookups (`read.rs`,
//! `lookup.rs`), the replica wait (`replica.rs`), the export (`export.rs`), erasures and
//! the audit trail (`erasure.rs`), partitions and retention (`retention.rs`), and exact
//! counts.
//!
//! # The epoch fence
//!
//! [`Store::apply`] writes dialog states in one transaction. For every dialog it first
//! upserts the `dialogs` row, changing it only where the stored epoch is not newer than
//! the one being written; that statement locks the row. Messages of a granted dialog are
//! inserted only when that upsert took. A refusal and a flush of the same dialog
//! therefore serialise on the row lock, and whichever commits last, the decision with the
//! newer epoch is what holds: a stale flush can never bring back what a refusal erased.
//!
//! # Erasure
//!
//! A refusal erases the dialog, not a range of it: when a refusal's upsert takes, every
//! stored message of the dialog is deleted in the same transaction, whatever its seq and
//! however it got there (an earlier incarnation of the dialog, a flush that raced it).
//! When the upsert does not take, nothing is deleted: PostgreSQL already holds a newer
//! decision, which either erased the dialog itself or belongs to a later incarnation
//! whose rows are not this refusal's to touch. A state that carries an unconfirmed
//! refusal (a grant that followed a refusal whose own erasure never reached PostgreSQL)
//! is written as two steps in one transaction: that refusal first, then the grant.
//!
//! Every statement here is planned for an index whatever the planner's mode, in its
//! generic plan too, and the ones that look rows up are planned on each call
//! (`.persistent(false)`), the erasure with sequential scans off: why, and the tests that
//! keep it so, in [`sql`]'s module documentation ("Plans").
//!
//! # Counts
//!
//! `message_counts` holds exact counts per (customer, language), per customer, per
//! language and in total (`-1` / `''` mean "any"), maintained by the same statements that
//! insert and delete messages, from the rows they actually inserted or deleted. Each
//! transaction adds into one of 16 shards of every counter it touches, so concurrent
//! flushes and erasures do not queue on one hot row; a count sums its shards. Each row
//! counts one month (`part`); `message_counts_fine` keeps the same counters per day and
//! per ten-minute slot, written by the same statements, for the exact count of a time
//! range (`sql`'s `page_range!`). A page answer reads its count and its rows in one statement, so both
//! come from one snapshot.
//!
//! # Order
//!
//! Readers see newest first: `received_at DESC, dialog_id DESC, seq DESC`, served by
//! scanning the `(…, received_at, dialog_id, seq)` indexes backwards.
//!
//! # Partitions and the last seq
//!
//! `messages` is partitioned by month of `received_at`, and old months are dropped whole
//! with their count rows (each count row carries its month): see [`retention`]. Every
//! per-dialog statement therefore probes each partition's primary key; the one asked on
//! the ingest path, the revival lookup, reads `dialogs.last_seq` instead (kept by the
//! grant's upsert, reset by a refusal). Connections run with `jit = off`: no statement
//! here is large enough for JIT to pay, and a plan that crossed `jit_above_cost` was once
//! compiled on every flush.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use time::OffsetDateTime;

pub use crate::domain::GrantedDialog;

pub mod erasure;
pub mod export;
mod lookup;
mod read;
mod replica;
pub mod retention;
pub mod sql;
use sql::PING;
mod write;

use read::{EARLIEST, bound_time, known_in, stored_message_ids_in};
pub use read::{Filter, HeldDialog, Known, Range, StoredMessage};
pub use replica::ReplicaLag;
pub use write::{Applied, ClaimFn, Claiming};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("PostgreSQL is unreachable")]
    Unavailable(#[source] sqlx::Error),
    #[error("PostgreSQL query failed")]
    Query(#[source] sqlx::Error),
    #[error("migrating the database failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the task writing to PostgreSQL failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the read replica has not replayed the primary's latest writes in time")]
    ReplicaBehind,
    #[error("the customer's erasure is under way: it erases this dialog, and the refusal waits for it")]
    ErasureUnderWay,
    #[error("the flush could not claim its dialogs in Redis before its commit")]
    Claim(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let unavailable = match &e {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => true,
            // Connection exceptions (08…), shutdown and start-up states (57P01–57P03),
            // too many connections (53300), a read-only server after a failover (25006),
            // a statement cancelled by a timeout or an operator (57014).
            E::Database(db) => db.code().is_some_and(|code| {
                code.starts_with("08")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300" | "25006" | "57014")
            }),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(e)
        } else {
            StoreError::Query(e)
        }
    }
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// A message fell in a month without a partition (a clock far ahead of maintenance).
    fn is_missing_partition(&self) -> bool {
        matches!(self, StoreError::Query(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("23514") && db.message().starts_with("no partition of relation"))
    }

    /// A deadlock or serialisation failure: the transaction may simply be run again.
    fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Query(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c == "40P01" || c == "40001"))
    }
}

/// A pool that connects when first used and gives up on a connection after a few seconds.
fn lazy_pool(url: &str) -> Result<PgPool, StoreError> {
    // No JIT: every statement here is small, and a plan whose cost crosses
    // `jit_above_cost` (any plan with a node disabled by `enable_seqscan = off`, which the
    // erasure's transaction sets) was compiled on every execution: ~1 s per flush batch
    // (measured, BENCHMARKS.md). `tests/api/plans.rs` also checks no plan needs one.
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()
        .map_err(StoreError::Query)?
        .options([("jit", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(options))
}

/// The one handle on PostgreSQL.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Where reads go when they do not go to `pool`: a streaming replica
    /// (`DATABASE_READ_URL`).
    replica: Option<PgPool>,
    /// Until when (ms since the Unix epoch) [`Store::decided_dialogs_quickly`] does not
    /// even try: set by its last failure, so an outage costs ingest one bounded wait per
    /// [`PROBE_BACKOFF`], not one per request.
    probe_closed_until_ms: Arc<AtomicU64>,
    /// The task that answers [`Store::decided_dialogs_quickly`] many requests at once;
    /// started on first use.
    lookups: Arc<OnceLock<lookup::Lookups>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Store {
    /// Creates the database when it is missing (and the role may), then a pool. The pool
    /// connects lazily and gives up on a connection after a few seconds, so an outage
    /// turns into prompt errors rather than hung requests.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if !Postgres::database_exists(url).await? {
            match Postgres::create_database(url).await {
                // Another process created it meanwhile.
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
                other => other?,
            }
            tracing::info!("created the database");
        }
        Ok(Self::from_pool(lazy_pool(url)?))
    }

    /// Reads (`GET /data`) go to `replica` from now on: a PostgreSQL streaming replica of
    /// this store's database. Connects lazily, as [`Store::connect`].
    pub fn with_replica(mut self, replica: &str) -> Result<Self, StoreError> {
        self.replica = Some(lazy_pool(replica)?);
        Ok(self)
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            replica: None,
            probe_closed_until_ms: Arc::new(AtomicU64::new(0)),
            lookups: Arc::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations (under sqlx's advisory lock, so concurrent starts
    /// are safe).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(PING).execute(&self.pool).await?;
        Ok(())
    }
}

/// Counter shards: concurrent transactions spread their count updates over this many rows
/// per counter instead of queueing on one.
const COUNTER_SHARDS: u32 = 16;

/// The shard this transaction writes its counts into: round-robin within a process, and
/// offset by the pid so that processes do not march in step.
pub(crate) fn next_counter_shard() -> i16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(std::process::id());
    i16::try_from(n % COUNTER_SHARDS).unwrap_or(0)
}

/// Microseconds since the Unix epoch → timestamp (values come from Redis's clock).
pub fn time_of(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Microseconds since the Unix epoch as dapi writes `receivedAt`: UTC, RFC 3339 with
/// microseconds (for clients that build a `receivedAfter`, such as dapi-load).
pub fn rfc3339_micros(micros: i64) -> String {
    time_of(micros)
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        ))
        .unwrap_or_default()
}

/// Timestamp → microseconds since the Unix epoch (PostgreSQL keeps microseconds).
pub fn micros_of(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_trip_through_timestamps() {
        let us = 1_795_000_000_123_456;
        assert_eq!(micros_of(time_of(us)), us);
    }
}
