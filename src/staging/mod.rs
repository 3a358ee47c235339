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
//! | `<prefix>:{<tag>}:d<id>:meta` | hash | `c` customer id, `d` decision (`p`/`g`/`r`), `e` epoch, `n` last seq, `q` flush queued (0/1), `t` decided at (µs), `x`/`xt` epoch and time of a refusal whose PostgreSQL erasure is not confirmed yet, `u` 1 while the dialog is unverified (staged when PostgreSQL could not be asked about it), `r` until when (ms) ingest last set meta's and msgs' expiry (0: set by another script, refresh at the next message) |
//! | `<prefix>:{<tag>}:d<id>:msgs` | list | staged messages in seq order, each `seq:receivedAt_µs:language:text`, or `seq:receivedAt_µs:language\|messageId\|:text` when the client gave a `messageId` |
//! | `<prefix>:{<tag>}:d<id>:ids` | hash | `messageId` → `seq:decision` of the first message with that id, and `~r` until when (ms) ingest last set its expiry; expires `DAPI_IDEMPOTENCY_WINDOW` (+ ≤ 1 %) after the last id was added |
//! | `<prefix>:{<tag>}:flush` | stream | the shard's flush-queue entries `d=<dialogId>`, read by the consumer group `flushers` |
//! | `<prefix>:{<tag>}:d<id>:quarantined:meta`, `…:quarantined:msgs` | hash, list | a dialog the flusher could not read, set aside as it was |
//! | `<prefix>:{<tag>}:quarantine` | hash | dialog id → `<unix seconds> <reason>` of every dialog of the shard set aside |

//!
//! # Expiry (Guarantee 5)
//!
//! Every write to a dialog — a message, a decision — sets its keys to expire
//! `DAPI_STAGING_TTL` later, whatever its decision: a granted dialog's state lasts that
//! long after its last message. The one exception is a refusal whose erasure PostgreSQL
//! has not confirmed (`x` set): its keys do not expire until the erasure commits (the
//! refusal handler's or the flusher's), however long PostgreSQL is away, and then the
//! TTL starts. Only the flush stream and the quarantine outlive that.
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

//! # Atomicity
//!
//! Each request is one call of one Lua script ([`Staging::stage`], [`Staging::decide`]),
//! under load shared with other single POSTs (`coalesce`): Redis runs it alone, so the
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
mod ingest;
pub mod keys;
mod queue;
mod replication;
mod status;
mod wire;

pub use conn::{CLUSTER_RETRIES, Connector, RedisConn, Timeouts};
pub use consent::{Choice, Decided, Recorded, Revival};
pub use erasure::ErasureRecord;
pub use ingest::{Create, IngestOutcome, NewMessage};
pub use keys::{Keyspace, SHARDS, Shard};
pub use status::StagedStatus;
pub use queue::{
    Claim, Finished, FlushQueue, InStore, KeepAlive, Life, QueueEntry, Settled, Snapshot, Unreadable,
    unique_consumer_name,
};

use std::sync::Arc;
use std::time::Duration;

use redis::{FromRedisValue, Script};

use crate::domain::DialogId;

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

/// A stream entry as XRANGE answers it: id and field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// The flush queue at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub length: u64,
    pub pending: u64,
    pub oldest_age: Duration,
}

/// The request path's handle on Redis: one multiplexed, self-reconnecting connection
/// shared by every request (one Redis or a cluster: see `conn`), and the scripts.
#[derive(Clone)]
pub struct Staging {
    conn: RedisConn,
    keys: Keyspace,
    ttl_ms: u64,
    idempotency_window_ms: u64,
    scripts: Arc<Scripts>,
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

struct Scripts {
    finish: Script,
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
            scripts: Arc::new(Scripts {
                finish: Script::new(include_str!("lua/finish.lua")),
            }),
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

    /// Tells Redis that PostgreSQL has applied the refusal recorded under `epoch`: the
    /// dialog stops waiting for its erasure and its keys start to expire (unless a newer
    /// refusal is waiting by now).
    pub async fn confirm_erasure(&self, dialog: DialogId, epoch: i64) -> Result<(), StagingError> {
        let d = dialog.get();
        let mut invocation = self.scripts.finish.prepare_invoke();
        invocation
            .key(self.keys.meta(d))
            .key(self.keys.msgs(d))
            .key(self.keys.quarantined_msgs(d))
            .key(self.keys.flush_stream_of(d))
            .arg(GROUP)
            .arg(1)
            .arg(self.ttl_ms)
            // finish.lua's octuple for one dialog: no life to trim in (nothing written),
            // the dialog, no last seq, nothing read, the refusal erased, nothing to take
            // back.
            .arg("")
            .arg(d)
            .arg(0)
            .arg(0)
            .arg(epoch)
            .arg("")
            .arg(0)
            .arg(0);
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// The flush queue over every shard: entries in all streams, entries delivered but
    /// not acknowledged, and the age of the oldest entry (by Redis's clock), for
    /// `/metrics`. One pipeline per shard (a pipeline stays in one slot on a cluster).
    pub async fn queue_stats(&self) -> Result<QueueStats, StagingError> {
        let mut conn = self.conn.clone();
        let mut stats = QueueStats {
            length: 0,
            pending: 0,
            oldest_age: Duration::ZERO,
        };
        for shard in 0..SHARDS {
            let stream = self.keys.flush_stream(shard);
            let mut pipe = redis::pipe();
            pipe.cmd("TIME")
                .cmd("XLEN")
                .arg(&stream)
                .cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            let ((seconds, micros), length, first): ((u64, u64), u64, Vec<StreamEntry>) =
                self.bounded(pipe.query_async(&mut conn)).await?;
            stats.length += length;
            if length == 0 {
                continue;
            }
            let now_ms = seconds * 1000 + micros / 1000;
            let oldest_ms = first
                .first()
                .and_then(|(id, _)| id.split('-').next())
                .and_then(|ms| ms.parse::<u64>().ok());
            let age = Duration::from_millis(oldest_ms.map_or(0, |ms| now_ms.saturating_sub(ms)));
            stats.oldest_age = stats.oldest_age.max(age);
            // The pending count needs the group, which exists once a flusher has started.
            let mut summary = redis::cmd("XPENDING");
            summary.arg(&stream).arg(GROUP);
            stats.pending += match self.bounded(summary.query_async::<Vec<redis::Value>>(&mut conn)).await {
                Ok(summary) => summary
                    .first()
                    .and_then(|count| redis::from_redis_value_ref::<u64>(count).ok())
                    .unwrap_or_default(),
                Err(StagingError::Redis(e)) if e.code() == Some("NOGROUP") => 0,
                Err(e) => return Err(e),
            };
        }
        Ok(stats)
    }

    /// Answers whether Redis responds: on a cluster, whether every shard's slot does (a
    /// node down, or a slot no primary serves, fails the POSTs of that shard's dialogs
    /// while the others go on: readiness says so rather than ask one node).
    pub async fn ping(&self) -> Result<(), StagingError> {
        let shards = if self.connector.is_cluster() { SHARDS } else { 1 };
        let pings = (0..shards).map(|shard| async move {
            let mut conn = self.conn.clone();
            let mut ping = redis::cmd("EXISTS");
            ping.arg(self.keys.flush_stream(shard));
            self.bounded(ping.query_async::<i64>(&mut conn)).await
        });
        for answer in futures_util::future::join_all(pings).await {
            answer?;
        }
        Ok(())
    }

    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StagingError> {
        // Dropping a call on a multiplexed connection is safe: its reply is discarded.
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StagingError::Timeout),
        }
    }
}
