//! The staging area in Redis: where every message waits until its dialog's consent.
//!
//! # Key layout
//!
//! Dialogs are spread over 64 fixed virtual shards ([`keys`]): every key of a dialog and
//! its shard's flush stream carry the shard's hash tag `{<tag>}` (`s<k>.<j>`), so that on
//! a Redis Cluster every script call stays in one slot. One Redis holds the same keys.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>:{<tag>}:d<id>:meta` | hash | the dialog's state, one letter a field: `a` a grant awaiting its audit event, `b` the life stamp, `c` customer id, `d` decision (`p`/`g`/`r`), `e` epoch, `n` last seq, `q` flush queued, `r` ingest's expiry deadline, `t` decided at, `u` unverified, `x`/`xt`/`xs` a refusal whose erasure PostgreSQL has not confirmed; each explained in `wire`'s table |
//! | `<prefix>:{<tag>}:d<id>:msgs` | list | staged messages in seq order, each `seq:receivedAt_µs:language:text`, or `seq:receivedAt_µs:language\|messageId\|:text` when the client gave a `messageId` |
//! | `<prefix>:{<tag>}:d<id>:ids` | hash | `messageId` → `seq:decision` of the first message with that id, and `~r` until when (ms) ingest last set its expiry; expires `DAPI_IDEMPOTENCY_WINDOW` (+ ≤ 1 %) after the last id was added |
//! | `<prefix>:{<tag>}:flush` | stream | the shard's flush-queue entries `d=<dialogId>`, read by the consumer group `flushers` |
//! | `<prefix>:{<tag>}:d<id>:quarantined:meta`, `…:quarantined:msgs` | hash, list | a dialog the flusher could not read, set aside as it was |
//! | `<prefix>:{<tag>}:quarantine` | hash | dialog id → `<unix seconds> <reason>` of every dialog of the shard set aside |
//! | `<prefix>:{<tag>}:customers` | sorted set | the customer index: a `<customer>:<dialog>` member, score 0, per dialog created or revived in the shard; an erasure reads one customer's range, and the flusher role's sweep removes the members of dialogs gone (`index.rs`) |
//! | `<prefix>:{<tag>}:c<customer>` | sorted set | the earlier layout's index of one customer (dialog → deadline, ms), no longer written: an erasure reads it until it expires by itself |
//! | `<prefix>:{<first tag>}:erasures` | hash | erasures PostgreSQL could not record (it was away), until it can (`wire::erasure_record`) |
//! | `<prefix>:{<tag>}:replication-fence` | string | a counter a replication round increments before its `WAIT` (`DAPI_REDIS_WAIT_REPLICAS`) |
//!
//! Every script's KEYS, ARGV and reply are typed in `wire`, one module per script.
//!
//! # Expiry (Guarantee 5)
//!
//! Every write to a dialog — a message, a decision — sets its keys to expire
//! `DAPI_STAGING_TTL` later, whatever its decision: a granted dialog's state lasts that
//! long after its last message. The one exception is a refusal whose erasure PostgreSQL
//! has not confirmed (`x` set): its keys do not expire until the erasure commits (the
//! refusal handler's or the flusher's), however long PostgreSQL is away, and then the
//! TTL starts. Only the flush stream, the quarantine and the customer index outlive that;
//! the index's members of dialogs gone leave at its next sweep (`index.rs`).
//!
//! # Redis forgetting a dialog
//!
//! A restart without persistence, a failover or an expiry can make Redis forget a dialog
//! that PostgreSQL holds as granted. The ingest script therefore stages nothing for a
//! dialog it does not know and answers `unknown`; the caller asks PostgreSQL (quickly,
//! never waiting on an outage) and calls again saying how to create it: as a new pending
//! dialog, as granted again with its seq continuing after PostgreSQL's last, or — when
//! PostgreSQL could not answer — as *unverified*: pending, marked `u` and queued, so that
//! the flusher settles it against PostgreSQL ([`FlushQueue::settle`]) before writing
//! anything of it. Redis can also forget part of a dialog — a failover to a replica that
//! missed the latest writes — and lose a refusal that PostgreSQL has applied: the
//! dialog's grant is then fenced at its next flush, and the flusher's finish takes the
//! refusal back from PostgreSQL (finish.lua) instead of flushing it again and again.
//!
//! # Atomicity
//!
//! A message or a decision is one call of one Lua script ([`Staging::stage`],
//! [`Staging::decide`]; a second call, after asking PostgreSQL, only creates a dialog
//! Redis did not know), under load shared with other single POSTs (`coalesce`): Redis
//! runs it alone, so the
//! check of owner and decision, the check of a repeated `messageId`, the seq, the append
//! and the queueing happen as one step per message — a retry racing its original stores
//! once. `receivedAt` and the epoch come from Redis's own clock
//! (`TIME`), one clock for any number of dapi processes.
//!
//! # The epoch
//!
//! Every decision moves the dialog's epoch on to the clock in microseconds (or one past
//! the last epoch, if that is later); a new dialog's epoch starts at the clock, so it is
//! newer than anything stored for a dialog of the same id that was forgotten before, and
//! a decision made after a failover lost earlier ones is newer than those. PostgreSQL keeps the epoch of the last decision it applied and
//! ignores older ones (see `store`): that is the fence that lets a refusal win a race
//! against a flush, and keeps a stale flush of a forgotten incarnation from touching a
//! later one.

mod coalesce;
mod conn;
mod consent;
mod erasure;
mod health;
mod index;
mod ingest;
pub mod keys;
mod queue;
mod replication;
mod status;
mod wire;

pub use conn::{CLUSTER_RETRIES, Connector, RedisConn, Timeouts};
pub use consent::{Choice, Decided, Recorded, Revival};
pub use erasure::ErasureRecord;
pub use health::QueueStats;
pub use index::IndexSweep;
pub use ingest::{Create, IngestOutcome, NewMessage};
pub use keys::{Keyspace, SHARDS, Shard};
pub use queue::{
    Claim, Finished, FlushQueue, InStore, KeepAlive, Life, QueueEntry, Settled, Snapshot, Unreadable,
    unique_consumer_name,
};
pub use status::StagedStatus;

use std::sync::Arc;
use std::time::Duration;

use redis::{FromRedisValue, Script};

/// How long a `messageId` is remembered per dialog unless configured otherwise.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// The consumer group every flusher reads the flush streams through.
pub const GROUP: &str = "flushers";

#[derive(Debug, Clone, thiserror::Error)]
pub enum StagingError {
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("Redis command failed")]
    Redis(#[from] redis::RedisError),
    #[error("Redis holds a value dapi did not write: {0}")]
    Corrupt(&'static str),
    #[error("Redis failed part-way through the request; this part was not staged")]
    Interrupted,
    #[error("{acked} of the {wanted} Redis replicas asked for confirmed the write in time; it may be staged")]
    NotReplicated { acked: usize, wanted: usize },
}

impl StagingError {
    /// Whether the error means "Redis is unreachable now" rather than a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StagingError::Timeout | StagingError::Interrupted | StagingError::NotReplicated { .. } => true,
            StagingError::Redis(e) => {
                e.is_timeout()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    // A cluster with no node reachable, or redirecting while a slot moves.
                    || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
                    || e.is_cluster_error()
                    // A connection Redis does not let dapi set up as REDIS_URL says: a
                    // wrong password or user, a database number Redis does not have.
                    // Not a fault of the request: 503 (and /readyz 503); the log says why.
                    || e.kind() == redis::ErrorKind::AuthenticationFailed
                    || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
                    || e.detail().is_some_and(|d| d.contains("DB index is out of range"))
                    // Out of memory under `noeviction`, loading its data set after a
                    // restart, a failover in progress: Redis is there but cannot take
                    // writes now.
                    || matches!(
                        e.code(),
                        Some(
                            "OOM"
                                | "LOADING"
                                | "BUSY"
                                | "MASTERDOWN"
                                | "READONLY"
                                | "TRYAGAIN"
                                | "CLUSTERDOWN"
                                | "MISCONF"
                                | "NOREPLICAS"
                        )
                    )
            }
            StagingError::Corrupt(_) => false,
        }
    }
}

/// The request path's handle on Redis: one multiplexed, self-reconnecting connection
/// shared by every request (one Redis or a cluster: see `conn`).
#[derive(Clone)]
pub struct Staging {
    conn: RedisConn,
    keys: Keyspace,
    ttl_ms: u64,
    idempotency_window_ms: u64,
    /// Upper bound on one call, so that a Redis outage answers 503 promptly.
    call_timeout: Duration,
    /// Kept to open the replication task's own connection.
    connector: Connector,
    /// Waits for replicas before a write is acknowledged (`DAPI_REDIS_WAIT_REPLICAS`);
    /// `None`: do not wait.
    replication: Option<replication::Replication>,
    /// Stages single messages together under load (see `coalesce`); started at the first
    /// one. `None` in the handle that task itself uses.
    coalescer: Option<Arc<std::sync::OnceLock<coalesce::Coalescer>>>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Milliseconds for `PEXPIRE`.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Indices of `items` grouped by their slot group, each group in the order given.
fn by_slot_group<T>(keys: &Keyspace, items: &[T], dialog: impl Fn(&T) -> i64) -> Vec<(Shard, Vec<usize>)> {
    let mut groups: Vec<(Shard, Vec<usize>)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let group = keys.slot_group(Keyspace::shard_of(dialog(item)));
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(i),
            None => groups.push((group, vec![i])),
        }
    }
    groups
}

impl Staging {
    /// Creates the handle without waiting for Redis: the connection is made on first use
    /// and remade after every loss, so the service starts and recovers while Redis is
    /// away. Needs a tokio runtime.
    pub fn new(connector: Connector, prefix: &str, ttl: Duration) -> Result<Self, StagingError> {
        let call_timeout = Duration::from_secs(2);
        let conn = connector.connect(Timeouts {
            connect: Duration::from_secs(1),
            response: call_timeout,
        })?;
        Ok(Self {
            conn,
            keys: Keyspace::new(prefix).for_cluster(connector.is_cluster()),
            ttl_ms: ttl_millis(ttl),
            idempotency_window_ms: ttl_millis(DEFAULT_IDEMPOTENCY_WINDOW),
            call_timeout,
            connector,
            replication: None,
            coalescer: Some(Arc::new(std::sync::OnceLock::new())),
        })
    }

    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// Acknowledge a write (ingest, decision) only once `replicas` Redis replicas hold it
    /// (`DAPI_REDIS_WAIT_REPLICAS`); else [`StagingError::NotReplicated`]. Starts the
    /// waiting task (see `replication`) on the current runtime.
    pub fn with_wait_replicas(mut self, replicas: usize) -> Result<Self, StagingError> {
        self.replication = match replicas {
            0 => None,
            n => Some(replication::Replication::start(&self.connector, self.keys.clone(), n)?),
        };
        Ok(self)
    }

    /// Runs a script call (built by `wire`) whose result is acknowledged to a client:
    /// with replicas to wait for, only once they hold it (on the primary of `shard`,
    /// which ran it).
    async fn run_acknowledged<T: FromRedisValue>(
        &self,
        shard: Shard,
        script: &Script,
        cmd: &redis::Cmd,
    ) -> Result<T, StagingError> {
        let mut conn = self.conn.clone();
        let value = self.bounded(wire::run(&mut conn, script, cmd)).await?;
        if let Some(replication) = &self.replication {
            replication.confirm(shard).await?;
        }
        Ok(value)
    }

    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StagingError> {
        // Dropping a call on a multiplexed connection is safe: its reply is discarded.
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StagingError::Timeout),
        }
    }
}
