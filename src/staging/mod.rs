//! The staging area in Redis: where every message waits until its dialog's consent.
//!
//! # Key layout
//!
//! Every key of one dialog shares the hash tag `{d<dialogId>}`, so one dialog's keys
//! live in one cluster slot. (The scripts also write the flush stream, and the flusher's
//! snapshot and finish span many dialogs: Redis Cluster needs the stream sharded by the
//! same tag first, which is not built yet. One Redis, or a primary with replicas, works.)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>:{d<id>}:meta` | hash | `c` customer id, `d` decision (`p`/`g`/`r`), `e` epoch, `n` last seq, `q` flush queued (0/1), `t` decided at (µs), `x`/`xt` epoch and time of a refusal whose PostgreSQL erasure is not confirmed yet, `u` 1 while the dialog is unverified (staged when PostgreSQL could not be asked about it) |
//! | `<prefix>:{d<id>}:msgs` | list | staged messages in seq order, each `seq:receivedAt_µs:language:text`, or `seq:receivedAt_µs:language\|messageId\|:text` when the client gave a `messageId` |
//! | `<prefix>:{d<id>}:ids` | hash | `messageId` → `seq:decision` of the first message with that id; expires `DAPI_IDEMPOTENCY_WINDOW` after the last id was added |
//! | `<prefix>:flush` | stream | flush-queue entries `d=<dialogId>`, read by the consumer group `flushers` |
//! | `<prefix>:{d<id>}:quarantined:meta`, `…:quarantined:msgs` | hash, list | a dialog the flusher could not read, set aside as it was |
//! | `<prefix>:quarantine` | hash | dialog id → `<unix seconds> <reason>` of every dialog set aside |
//!
//! # Expiry (Guarantee 5)
//!
//! Every write to a dialog — a message, a decision — sets its keys to expire
//! `DAPI_STAGING_TTL` later, whatever its decision: a granted dialog's state lasts that
//! long after its last message. The one exception is a refusal whose erasure PostgreSQL
//! has not confirmed (`x` set): its keys do not expire until the erasure commits (the
//! refusal handler's or the flusher's), however long PostgreSQL is away, and then the
//! TTL starts. Only the flush stream and the quarantine outlive that. dapi's first
//! release kept granted dialogs' keys without expiry; on start, once per Redis,
//! [`Staging::expire_keys_older_releases_kept`] gives such keys their TTL.
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
//! Each request is one call of one Lua script ([`Staging::stage`], [`Staging::decide`]):
//! Redis runs it alone, so the check of owner and decision, the check of a repeated
//! `messageId`, the seq, the append and the queueing happen as one step — a retry racing
//! its original stores once. `receivedAt` and the epoch come from Redis's own clock
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

mod queue;
mod replication;

pub use queue::{Finished, FlushQueue, KeepAlive, QueueEntry, Settled, Snapshot, Unreadable, unique_consumer_name};

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, FromRedisValue, Script, ScriptInvocation};

use crate::domain::{CustomerId, Decision, DialogId, IncomingMessage};

/// How long a `messageId` is remembered per dialog unless configured otherwise.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// The consumer group every flusher reads the flush stream through.
pub const GROUP: &str = "flushers";

/// Builds every Redis key dapi uses; the one place the layout above is written down in code.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: Arc<str>,
}

impl Keyspace {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn meta(&self, dialog: i64) -> String {
        format!("{}:{{d{dialog}}}:meta", self.prefix)
    }

    pub fn msgs(&self, dialog: i64) -> String {
        format!("{}:{{d{dialog}}}:msgs", self.prefix)
    }

    pub fn ids(&self, dialog: i64) -> String {
        format!("{}:{{d{dialog}}}:ids", self.prefix)
    }

    pub fn flush_stream(&self) -> String {
        format!("{}:flush", self.prefix)
    }

    pub fn quarantined_meta(&self, dialog: i64) -> String {
        format!("{}:{{d{dialog}}}:quarantined:meta", self.prefix)
    }

    pub fn quarantined_msgs(&self, dialog: i64) -> String {
        format!("{}:{{d{dialog}}}:quarantined:msgs", self.prefix)
    }

    /// Dialog id → `<unix seconds> <reason>` of every dialog set aside.
    pub fn quarantine_index(&self) -> String {
        format!("{}:quarantine", self.prefix)
    }

    /// A pattern matching every dialog's meta key (for `SCAN`).
    fn meta_pattern(&self) -> String {
        format!("{}:{{d*}}:meta", self.prefix)
    }

    /// The marker that [`Staging::expire_keys_older_releases_kept`] has run: one fixed
    /// key per prefix, which does not expire.
    pub fn expiry_sweep_marker(&self) -> String {
        format!("{}:upgrade:expiry-v1", self.prefix)
    }

    /// The key the replication task increments before each `WAIT` (one fixed key).
    fn replication_fence(&self) -> String {
        format!("{}:replication-fence", self.prefix)
    }

    /// A pattern matching every key of this prefix (for tests and operators' `SCAN`).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
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

/// What became of a message offered to [`Staging::ingest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Staged, or (`duplicate`) a repeat of a `messageId` already staged: then `seq` and
    /// `decision` are the first answer's, and nothing was stored.
    Accepted {
        seq: i64,
        decision: Decision,
        duplicate: bool,
    },
    CustomerMismatch,
    ConsentRefused,
    /// Redis does not know the dialog and was not told how to create it: nothing staged.
    Unknown,
}

/// One message for [`Staging::stage`].
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub customer: CustomerId,
    pub dialog: DialogId,
    pub message: &'a IncomingMessage,
    pub create: Create,
}

/// How [`Staging::stage`] creates a dialog Redis does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Don't: answer [`IngestOutcome::Unknown`] so the caller can ask PostgreSQL first.
    Not,
    /// PostgreSQL holds no grant for it: a new pending dialog.
    New,
    /// PostgreSQL holds it as granted, its last stored seq given: granted again, its seq
    /// continuing.
    Revive { last_seq: i64 },
    /// PostgreSQL could not be asked: pending and unverified, for the flusher to settle.
    Unverified,
}

/// A decision as recorded in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub epoch: i64,
    pub customer: CustomerId,
    pub decided_at_us: i64,
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

/// How to bring back a dialog Redis no longer knows but PostgreSQL does.
#[derive(Debug, Clone, Copy)]
pub struct Revival {
    pub customer: CustomerId,
    pub last_seq: i64,
}

/// The request path's handle on Redis: one multiplexed, self-reconnecting connection
/// shared by every request, and the scripts.
#[derive(Clone)]
pub struct Staging {
    conn: ConnectionManager,
    keys: Keyspace,
    ttl_ms: u64,
    idempotency_window_ms: u64,
    scripts: Arc<Scripts>,
    /// Upper bound on one call, so that a Redis outage answers 503 promptly.
    call_timeout: Duration,
    /// Kept to open the replication task's own connection.
    client: Client,
    /// Waits for replicas before a write is acknowledged (`DAPI_REDIS_WAIT_REPLICAS`);
    /// `None`: do not wait.
    replication: Option<replication::Replication>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    ingest: Script,
    consent: Script,
    finish: Script,
    expire: Script,
}

/// Milliseconds for `PEXPIRE`.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

impl Staging {
    /// Creates the handle without waiting for Redis: the connection is made on first use
    /// and remade after every loss, so the service starts and recovers while Redis is away.
    pub fn new(client: Client, prefix: &str, ttl: Duration) -> Result<Self, StagingError> {
        let call_timeout = Duration::from_secs(2);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(call_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            conn,
            keys: Keyspace::new(prefix),
            ttl_ms: ttl_millis(ttl),
            idempotency_window_ms: ttl_millis(DEFAULT_IDEMPOTENCY_WINDOW),
            scripts: Arc::new(Scripts {
                ingest: Script::new(include_str!("lua/ingest.lua")),
                consent: Script::new(include_str!("lua/consent.lua")),
                finish: Script::new(include_str!("lua/finish.lua")),
                expire: Script::new(include_str!("lua/expire.lua")),
            }),
            call_timeout,
            client,
            replication: None,
        })
    }

    /// Acknowledge a write (ingest, decision) only once `replicas` Redis replicas hold it
    /// (`DAPI_REDIS_WAIT_REPLICAS`); else [`StagingError::NotReplicated`]. Starts the
    /// waiting task (see `replication`) on the current runtime.
    pub fn with_wait_replicas(mut self, replicas: usize) -> Result<Self, StagingError> {
        self.replication = match replicas {
            0 => None,
            n => Some(replication::Replication::start(
                self.client.clone(),
                self.keys.replication_fence(),
                n,
            )?),
        };
        Ok(self)
    }

    /// Runs a script whose result is acknowledged to a client: with replicas to wait
    /// for, only once they hold it.
    async fn invoke_acknowledged<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StagingError> {
        let mut conn = self.conn.clone();
        let value = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if let Some(replication) = &self.replication {
            replication.confirm().await?;
        }
        Ok(value)
    }

    /// Stages messages in one script call, one round trip: an outcome per message, in
    /// order. `create` says, per message, what to do when Redis does not know its dialog
    /// (see the module's "Redis forgetting a dialog").
    pub async fn stage(&self, messages: &[NewMessage<'_>]) -> Result<Vec<IngestOutcome>, StagingError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.scripts.ingest.prepare_invoke();
        invocation
            .key(self.keys.flush_stream())
            .arg(self.ttl_ms)
            .arg(self.idempotency_window_ms);
        for m in messages {
            let d = m.dialog.get();
            let (mode, last_seq) = match m.create {
                Create::Not => ("", 0),
                Create::New => ("new", 0),
                Create::Revive { last_seq } => ("revive", last_seq),
                Create::Unverified => ("unverified", 0),
            };
            invocation
                .key(self.keys.meta(d))
                .key(self.keys.msgs(d))
                .key(self.keys.ids(d))
                .arg(m.customer.get())
                .arg(d)
                .arg(m.message.language.as_str())
                .arg(m.message.text.as_str())
                .arg(m.message.message_id.as_ref().map_or("", |id| id.as_str()))
                .arg(mode)
                .arg(last_seq);
        }
        let replies: Vec<(String, i64, String)> = self.invoke_acknowledged(&invocation).await?;
        if replies.len() != messages.len() {
            return Err(StagingError::Corrupt("ingest reply has the wrong length"));
        }
        replies
            .into_iter()
            .map(|(status, seq, decision)| {
                let decision = || Decision::from_letter(decision.as_bytes()).ok_or(StagingError::Corrupt("decision"));
                Ok(match status.as_str() {
                    "ok" => IngestOutcome::Accepted {
                        seq,
                        decision: decision()?,
                        duplicate: false,
                    },
                    "dup" => IngestOutcome::Accepted {
                        seq,
                        decision: decision()?,
                        duplicate: true,
                    },
                    "mismatch" => IngestOutcome::CustomerMismatch,
                    "refused" => IngestOutcome::ConsentRefused,
                    "unknown" => IngestOutcome::Unknown,
                    _ => return Err(StagingError::Corrupt("unknown ingest status")),
                })
            })
            .collect()
    }

    /// How long a `messageId` is remembered per dialog (`DAPI_IDEMPOTENCY_WINDOW`).
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window_ms = ttl_millis(window).max(1);
        self
    }

    /// Records a decision. Returns `None` when Redis knows nothing of the dialog and no
    /// `revival` was given; with one, the dialog is re-created from it first.
    pub async fn decide(
        &self,
        dialog: DialogId,
        approved: bool,
        revival: Option<Revival>,
    ) -> Result<Option<Recorded>, StagingError> {
        let d = dialog.get();
        let mut invocation = self.scripts.consent.prepare_invoke();
        invocation
            .key(self.keys.meta(d))
            .key(self.keys.msgs(d))
            .key(self.keys.flush_stream())
            .key(self.keys.ids(d))
            .key(self.keys.quarantined_msgs(d))
            .arg(d)
            .arg(if approved { Decision::Granted } else { Decision::Refused }.letter())
            .arg(self.ttl_ms);
        match revival {
            Some(r) => invocation.arg(r.customer.get()).arg(r.last_seq),
            None => invocation.arg("").arg(0),
        };
        let (status, epoch, customer, decided_at_us): (String, i64, i64, i64) =
            self.invoke_acknowledged(&invocation).await?;
        Ok((status == "ok").then_some(Recorded {
            epoch,
            customer: CustomerId::from_stored(customer),
            decided_at_us,
        }))
    }

    /// Tells Redis that PostgreSQL has applied the refusal recorded under `epoch`: the
    /// dialog stops waiting for its erasure and its keys start to expire (unless a newer
    /// refusal is waiting by now).
    pub async fn confirm_erasure(&self, dialog: DialogId, epoch: i64) -> Result<(), StagingError> {
        let d = dialog.get();
        let mut invocation = self.scripts.finish.prepare_invoke();
        invocation
            .key(self.keys.flush_stream())
            .key(self.keys.meta(d))
            .key(self.keys.msgs(d))
            .key(self.keys.ids(d))
            .arg(GROUP)
            .arg(1)
            .arg(self.ttl_ms)
            .arg(d)
            .arg(0)
            .arg(0)
            .arg(epoch)
            .arg(0);
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Gives every dialog's keys that an older release left without expiry their
    /// `DAPI_STAGING_TTL`, from now (Guarantee 5: bounded staging). dapi's first release
    /// kept a granted dialog's keys for ever; a Redis upgraded from it would keep every
    /// granted dialog that never gets another message. Walks the dialogs with `SCAN`
    /// (1000 at a time, one pipelined script call per dialog: each call stays within one
    /// dialog's keys), skips refusals awaiting their erasure and dialogs set aside, and
    /// then sets a marker so that later starts skip the walk. Safe to run from several
    /// processes at once. Returns how many dialogs it gave an expiry.
    pub async fn expire_keys_older_releases_kept(&self) -> Result<u64, StagingError> {
        let mut conn = self.conn.clone();
        let marker = self.keys.expiry_sweep_marker();
        let done: bool = self
            .bounded(redis::cmd("EXISTS").arg(&marker).query_async(&mut conn))
            .await?;
        if done {
            return Ok(0);
        }
        let (pattern, prefix) = (self.keys.meta_pattern(), format!("{}:{{d", self.keys.prefix));
        let mut cursor: u64 = 0;
        let mut expired = 0;
        loop {
            let (next, metas): (u64, Vec<String>) = self
                .bounded(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
            let dialogs: Vec<i64> = metas
                .iter()
                .filter_map(|key| key.strip_prefix(&prefix)?.strip_suffix("}:meta")?.parse().ok())
                .collect();
            if !dialogs.is_empty() {
                let mut pipe = redis::pipe();
                for &d in &dialogs {
                    let mut invocation = self.scripts.expire.prepare_invoke();
                    invocation
                        .key(self.keys.meta(d))
                        .key(self.keys.msgs(d))
                        .arg(self.ttl_ms);
                    pipe.invoke_script(&invocation);
                }
                // Loaded first: a pipeline cannot load a script on NOSCRIPT half-way.
                let _: String = self.bounded(self.scripts.expire.load_async(&mut conn)).await?;
                let set: Vec<u64> = self.bounded(pipe.query_async(&mut conn)).await?;
                expired += set.iter().sum::<u64>();
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let _: () = self
            .bounded(redis::cmd("SET").arg(&marker).arg(1).query_async(&mut conn))
            .await?;
        Ok(expired)
    }

    /// The flush queue's length, entries delivered but not acknowledged, and the age of
    /// its oldest entry (by Redis's clock), for `/metrics`.
    pub async fn queue_stats(&self) -> Result<QueueStats, StagingError> {
        let stream = self.keys.flush_stream();
        let mut conn = self.conn.clone();
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
        let now_ms = seconds * 1000 + micros / 1000;
        let oldest_ms = first
            .first()
            .and_then(|(id, _)| id.split('-').next())
            .and_then(|ms| ms.parse::<u64>().ok());
        // The pending count needs the group, which exists once a flusher has started.
        let mut summary = redis::cmd("XPENDING");
        summary.arg(&stream).arg(GROUP);
        let pending = match self.bounded(summary.query_async::<Vec<redis::Value>>(&mut conn)).await {
            Ok(summary) => summary
                .first()
                .and_then(|count| redis::from_redis_value_ref::<u64>(count).ok())
                .unwrap_or_default(),
            Err(StagingError::Redis(e)) if e.code() == Some("NOGROUP") => 0,
            Err(e) => return Err(e),
        };
        Ok(QueueStats {
            length,
            pending,
            oldest_age: Duration::from_millis(oldest_ms.map_or(0, |ms| now_ms.saturating_sub(ms))),
        })
    }

    /// Answers whether Redis responds.
    pub async fn ping(&self) -> Result<(), StagingError> {
        let mut conn = self.conn.clone();
        let _: String = self.bounded(redis::cmd("PING").query_async(&mut conn)).await?;
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
