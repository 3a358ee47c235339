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
pub mod keys;
mod queue;
mod replication;

pub use conn::{CLUSTER_RETRIES, Connector, RedisConn, Timeouts};
pub use keys::{Keyspace, SHARDS, Shard};
pub use queue::{
    Claim, Finished, FlushQueue, InStore, KeepAlive, Life, QueueEntry, Settled, Snapshot, Unreadable,
    unique_consumer_name,
};

use std::sync::Arc;
use std::time::Duration;

use redis::{FromRedisValue, Script, ScriptInvocation};

use crate::domain::{CustomerId, Decision, DialogId, GrantToAudit, IncomingMessage};

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

/// What became of a message offered to [`Staging::stage`].
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
    /// Keys of the dialog held a type dapi does not write there (a hand edit, a bug):
    /// they were set aside under their quarantine names, nothing was staged, and the
    /// dialog is now as if Redis had forgotten it.
    SetAside,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub epoch: i64,
    pub customer: CustomerId,
    pub decided_at_us: i64,
    /// A grant whose audit event no flush has written yet (a refusal overtook it).
    pub unwritten_grant: Option<GrantToAudit>,
    /// The seqs of the staged (and quarantined) messages a refusal deleted.
    pub erased_staged: Vec<i64>,
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
    /// The decision PostgreSQL holds (`None`: none, as for a refusal recorded while
    /// PostgreSQL could not be asked): the standing one a new decision is compared with.
    pub standing: Option<Decision>,
}

/// Where a dialog stands in Redis ([`Staging::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedStatus {
    pub customer: CustomerId,
    pub decision: Decision,
    /// When the latest decision was recorded (µs; for a pending dialog, its creation).
    pub decided_at_us: i64,
    /// The seqs of its staged messages, in order.
    pub staged: Vec<i64>,
}

/// An erasure PostgreSQL could not record, kept in Redis until it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErasureRecord {
    pub customer: CustomerId,
    pub erasure_id: uuid::Uuid,
    pub requested_at_us: i64,
}

/// What [`Staging::decide`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    Recorded(Recorded),
    /// Redis does not know the dialog and no revival was given: nothing recorded.
    Unknown,
    /// The dialog belongs to another customer than the one the call named: nothing
    /// recorded.
    OtherCustomer,
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
    ingest: Script,
    consent: Script,
    customer_dialogs: Script,
    status: Script,
    erasure_record: Script,
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
                ingest: Script::new(include_str!("lua/ingest.lua")),
                consent: Script::new(include_str!("lua/consent.lua")),
                customer_dialogs: Script::new(include_str!("lua/customer_dialogs.lua")),
                status: Script::new(include_str!("lua/status.lua")),
                erasure_record: Script::new(include_str!("lua/erasure_record.lua")),
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

    /// Runs a script whose result is acknowledged to a client: with replicas to wait
    /// for, only once they hold it (on the primary of `shard`, which ran it).
    async fn invoke_acknowledged<T: FromRedisValue>(
        &self,
        shard: Shard,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StagingError> {
        let mut conn = self.conn.clone();
        let value = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if let Some(replication) = &self.replication {
            replication.confirm(shard).await?;
        }
        Ok(value)
    }

    /// [`Self::invoke_acknowledged`] for a script call built as a command (`EVALSHA` of
    /// `script`'s hash): loaded first when Redis does not know it, as
    /// `ScriptInvocation::invoke_async` does.
    async fn run_acknowledged<T: FromRedisValue>(
        &self,
        shard: Shard,
        script: &Script,
        cmd: &redis::Cmd,
    ) -> Result<T, StagingError> {
        let mut conn = self.conn.clone();
        let value = match self.bounded(cmd.query_async(&mut conn)).await {
            Err(StagingError::Redis(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.bounded(script.load_async(&mut conn)).await?;
                self.bounded(cmd.query_async(&mut conn)).await?
            }
            other => other?,
        };
        if let Some(replication) = &self.replication {
            replication.confirm(shard).await?;
        }
        Ok(value)
    }

    /// Stages messages: one script call per slot group (one for everything on one Redis,
    /// one per shard on a cluster), the groups at once, an outcome per message, in order.
    /// `create` says, per message, what to do when Redis does not know its dialog (see
    /// the module's "Redis forgetting a dialog"). `Err` when nothing was staged; a group
    /// that failed while others were staged answers its messages with the error
    /// ([`StagingError::Interrupted`], or [`StagingError::NotReplicated`]). A single
    /// message goes in a call with the other single messages waiting (see `coalesce`).
    pub async fn stage(
        &self,
        messages: &[NewMessage<'_>],
    ) -> Result<Vec<Result<IngestOutcome, StagingError>>, StagingError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if let ([message], Some(coalescer)) = (messages, &self.coalescer) {
            let coalescer = coalescer.get_or_init(|| {
                coalesce::Coalescer::start(Staging {
                    coalescer: None,
                    ..self.clone()
                })
            });
            return Ok(vec![Ok(coalescer.stage(message).await?)]);
        }
        // One slot group (one Redis, or a single message): one call, nothing to sort.
        if !self.keys.is_cluster() || messages.len() == 1 {
            let shard = Keyspace::shard_of(messages[0].dialog.get());
            return Ok(self
                .stage_group(shard, messages.iter())
                .await?
                .into_iter()
                .map(Ok)
                .collect());
        }
        let groups = by_slot_group(&self.keys, messages, |m| m.dialog.get());
        let calls = groups.iter().map(|(_, members)| {
            let shard = Keyspace::shard_of(messages[members[0]].dialog.get());
            self.stage_group(shard, members.iter().map(|&i| &messages[i]))
        });
        let answers = futures_util::future::join_all(calls).await;
        if answers.iter().all(Result::is_err) {
            return Err(answers
                .into_iter()
                .find_map(Result::err)
                .unwrap_or(StagingError::Interrupted));
        }
        let mut outcomes: Vec<Option<Result<IngestOutcome, StagingError>>> = messages.iter().map(|_| None).collect();
        for ((_, members), answer) in groups.iter().zip(answers) {
            match answer {
                Ok(staged) => {
                    for (&i, outcome) in members.iter().zip(staged) {
                        outcomes[i] = Some(Ok(outcome));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::chain(&e), "Redis failed for part of a batch");
                    for &i in members {
                        outcomes[i] = Some(Err(match e {
                            StagingError::NotReplicated { acked, wanted } => {
                                StagingError::NotReplicated { acked, wanted }
                            }
                            _ => StagingError::Interrupted,
                        }));
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(StagingError::Corrupt("no outcome"))))
            .collect())
    }

    /// One script call for messages of one slot group (`shard`: any of its shards, for
    /// the replicas' confirmation).
    async fn stage_group<'m>(
        &self,
        shard: Shard,
        messages: impl ExactSizeIterator<Item = &'m NewMessage<'m>>,
    ) -> Result<Vec<IngestOutcome>, StagingError> {
        let messages: Vec<&NewMessage<'_>> = messages.collect();
        metrics::histogram!(crate::telemetry::INGEST_CALL_MESSAGES).record(messages.len() as f64);
        // EVALSHA built by hand rather than through redis-rs's `ScriptInvocation`: keys
        // and arguments go straight into the command's one buffer (`ScriptInvocation`
        // allocates each, then copies them all into a command).
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.ingest.get_hash()).arg(4 * messages.len());
        for m in &messages {
            let d = m.dialog.get();
            cmd.arg(self.keys.dialog_key_arg(d, "meta"))
                .arg(self.keys.dialog_key_arg(d, "msgs"))
                .arg(self.keys.dialog_key_arg(d, "ids"))
                .arg(self.keys.flush_stream_arg(Keyspace::shard_of(d)));
        }
        cmd.arg(self.ttl_ms).arg(self.idempotency_window_ms);
        for m in &messages {
            cmd.arg(m.customer.get())
                .arg(m.message.language.as_str())
                .arg(m.message.text.as_str())
                .arg(m.message.message_id.as_ref().map_or("", |id| id.as_str()));
            match m.create {
                Create::Not => cmd.arg(""),
                Create::New => cmd.arg("n"),
                Create::Revive { last_seq } => cmd.arg(last_seq),
                Create::Unverified => cmd.arg("u"),
            };
        }
        let reply: Vec<i64> = self.run_acknowledged(shard, &self.scripts.ingest, &cmd).await?;
        let outcomes = parse_ingest_reply(&reply)?;
        if outcomes.len() != messages.len() {
            return Err(StagingError::Corrupt("ingest reply has the wrong length"));
        }
        Ok(outcomes)
    }

    /// How long a `messageId` is remembered per dialog (`DAPI_IDEMPOTENCY_WINDOW`).
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window_ms = ttl_millis(window).max(1);
        self
    }

    /// Records a decision. With a `revival`, a dialog Redis knows nothing of is
    /// re-created from it first; with `only_for`, a dialog of another customer is left
    /// alone.
    pub async fn decide(
        &self,
        dialog: DialogId,
        approved: bool,
        revival: Option<Revival>,
        only_for: Option<CustomerId>,
    ) -> Result<Decided, StagingError> {
        let d = dialog.get();
        let mut invocation = self.scripts.consent.prepare_invoke();
        invocation
            .key(self.keys.meta(d))
            .key(self.keys.msgs(d))
            .key(self.keys.flush_stream_of(d))
            .key(self.keys.quarantined_msgs(d))
            .key(self.keys.quarantined_meta(d))
            .key(self.keys.quarantine_index(Keyspace::shard_of(d)))
            .arg(d)
            .arg(if approved { Decision::Granted } else { Decision::Refused }.letter())
            .arg(self.ttl_ms);
        match revival {
            Some(r) => invocation
                .arg(r.customer.get())
                .arg(r.last_seq)
                .arg(r.standing.map_or("", Decision::letter)),
            None => invocation.arg("").arg(0).arg(""),
        };
        invocation.arg(only_for.map_or(String::new(), |c| c.get().to_string()));
        type Reply = (String, i64, i64, i64, String, String, Vec<i64>);
        let (status, epoch, customer, decided_at_us, aside, unaudited, erased_staged): Reply =
            self.invoke_acknowledged(Keyspace::shard_of(d), &invocation).await?;
        if aside == "set-aside" {
            metrics::counter!(crate::telemetry::REQUEST_QUARANTINED).increment(1);
            tracing::error!(
                dialog = d,
                "a decision found the dialog's state in Redis of a type dapi does not write there: a refusal \
                 removed it, a grant set it aside (docs/operations.md, \"Quarantine\")"
            );
        }
        Ok(match status.as_str() {
            "ok" => Decided::Recorded(Recorded {
                epoch,
                customer: CustomerId::from_stored(customer),
                decided_at_us,
                unwritten_grant: GrantToAudit::parse(&unaudited),
                erased_staged,
            }),
            "other" => Decided::OtherCustomer,
            "unknown" => Decided::Unknown,
            _ => return Err(StagingError::Corrupt("consent reply")),
        })
    }

    /// The dialogs Redis holds indexed under `customer`, in every shard (one script call
    /// per slot group, at once): the staged dialogs an erasure must refuse. A dialog may
    /// be named that belongs to another customer by now; [`Staging::decide`] with
    /// `only_for` leaves such a one alone.
    pub async fn customer_dialogs(&self, customer: CustomerId) -> Result<Vec<DialogId>, StagingError> {
        let calls = self.keys.shard_groups().into_iter().map(|group| {
            let mut invocation = self.scripts.customer_dialogs.prepare_invoke();
            for shard in group {
                invocation.key(self.keys.customer_index(shard, customer.get()));
            }
            let mut conn = self.conn.clone();
            async move { self.bounded(invocation.invoke_async::<Vec<i64>>(&mut conn)).await }
        });
        let mut dialogs = Vec::new();
        for found in futures_util::future::join_all(calls).await {
            dialogs.extend(found?.into_iter().map(DialogId::from_stored));
        }
        dialogs.sort_unstable();
        dialogs.dedup();
        Ok(dialogs)
    }

    /// Where `dialog` stands in Redis; `None` when Redis does not know it.
    pub async fn status(&self, dialog: DialogId) -> Result<Option<StagedStatus>, StagingError> {
        let d = dialog.get();
        let mut invocation = self.scripts.status.prepare_invoke();
        invocation.key(self.keys.meta(d)).key(self.keys.msgs(d));
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            _ => None,
        };
        let [customer, decision, at, seqs] = reply.as_slice() else {
            return Ok(None);
        };
        let (Some(customer), Some(decision)) = (
            text(customer).and_then(|c| c.parse::<i64>().ok()),
            text(decision)
                .as_deref()
                .and_then(|d| Decision::from_letter(d.as_bytes())),
        ) else {
            return Ok(None);
        };
        let staged = match seqs {
            redis::Value::Array(items) => items.iter().filter_map(|v| text(v)?.parse().ok()).collect(),
            _ => Vec::new(),
        };
        Ok(Some(StagedStatus {
            customer: CustomerId::from_stored(customer),
            decision,
            decided_at_us: text(at).and_then(|t| t.parse().ok()).unwrap_or_default(),
            staged,
        }))
    }

    /// Records the erasure of `customer` in Redis (PostgreSQL being away), or finds the
    /// one recorded already.
    pub async fn record_erasure(
        &self,
        customer: CustomerId,
        id: uuid::Uuid,
        now_us: i64,
    ) -> Result<ErasureRecord, StagingError> {
        let mut invocation = self.scripts.erasure_record.prepare_invoke();
        invocation
            .key(self.keys.erasure_records())
            .arg(customer.get())
            .arg(id.hyphenated().to_string())
            .arg(now_us);
        let mut conn = self.conn.clone();
        let record: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        parse_record(customer.get(), &record).ok_or(StagingError::Corrupt("erasure record"))
    }

    /// The erasure recorded in Redis under `id`, if any.
    pub async fn erasure_record(&self, id: uuid::Uuid) -> Result<Option<ErasureRecord>, StagingError> {
        let mut conn = self.conn.clone();
        let field = format!("e{}", id.hyphenated());
        let raw: Option<String> = self
            .bounded(
                redis::cmd("HGET")
                    .arg(self.keys.erasure_records())
                    .arg(field)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(raw.and_then(|raw| {
            let (customer, at) = raw.split_once(' ')?;
            Some(ErasureRecord {
                customer: CustomerId::from_stored(customer.parse().ok()?),
                erasure_id: id,
                requested_at_us: at.parse().ok()?,
            })
        }))
    }

    /// Every erasure recorded in Redis.
    pub async fn erasure_records(&self) -> Result<Vec<ErasureRecord>, StagingError> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = self
            .bounded(
                redis::cmd("HGETALL")
                    .arg(self.keys.erasure_records())
                    .query_async(&mut conn),
            )
            .await?;
        Ok(all
            .iter()
            .filter_map(|(field, value)| parse_record(field.strip_prefix('c')?.parse().ok()?, value))
            .collect())
    }

    /// Forgets an erasure recorded in Redis (PostgreSQL holds it now).
    pub async fn forget_erasure_record(&self, record: &ErasureRecord) -> Result<(), StagingError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .bounded(
                redis::cmd("HDEL")
                    .arg(self.keys.erasure_records())
                    .arg(format!("c{}", record.customer.get()))
                    .arg(format!("e{}", record.erasure_id.hyphenated()))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
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

/// A customer's erasure record, `<erasure id> <requested-at µs>`.
fn parse_record(customer: i64, raw: &str) -> Option<ErasureRecord> {
    let (id, at) = raw.split_once(' ')?;
    Some(ErasureRecord {
        customer: CustomerId::from_stored(customer),
        erasure_id: uuid::Uuid::parse_str(id).ok()?,
        requested_at_us: at.parse().ok()?,
    })
}

/// The ingest script's answer: one integer per message, `seq * 32 + status * 4 +
/// decision` (ingest.lua says why integers).
fn parse_ingest_reply(reply: &[i64]) -> Result<Vec<IngestOutcome>, StagingError> {
    reply
        .iter()
        .map(|&item| {
            let (seq, status, decision) = (item >> 5, (item >> 2) & 7, item & 3);
            let decision = || match decision {
                0 => Ok(Decision::Pending),
                1 => Ok(Decision::Granted),
                2 => Ok(Decision::Refused),
                _ => Err(StagingError::Corrupt("decision")),
            };
            Ok(match status {
                0 | 1 if seq > 0 => IngestOutcome::Accepted {
                    seq,
                    decision: decision()?,
                    duplicate: status == 1,
                },
                2 => IngestOutcome::CustomerMismatch,
                3 => IngestOutcome::ConsentRefused,
                4 => IngestOutcome::Unknown,
                5 => IngestOutcome::SetAside,
                _ => return Err(StagingError::Corrupt("ingest reply")),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_answers_decode_to_their_outcomes_and_anything_else_is_corrupt() {
        let staged = |seq: i64, status: i64, decision: i64| seq * 32 + status * 4 + decision;
        let outcomes = parse_ingest_reply(&[
            staged(7, 0, 0),
            staged(8, 1, 1),
            staged(0, 2, 0),
            staged(0, 3, 0),
            staged(0, 4, 0),
        ])
        .unwrap(); // allow: a unit test
        assert_eq!(
            outcomes,
            [
                IngestOutcome::Accepted {
                    seq: 7,
                    decision: Decision::Pending,
                    duplicate: false
                },
                IngestOutcome::Accepted {
                    seq: 8,
                    decision: Decision::Granted,
                    duplicate: true
                },
                IngestOutcome::CustomerMismatch,
                IngestOutcome::ConsentRefused,
                IngestOutcome::Unknown,
            ]
        );
        for corrupt in [staged(0, 0, 0), staged(3, 0, 3), staged(3, 6, 0), -1] {
            assert!(
                matches!(parse_ingest_reply(&[corrupt]), Err(StagingError::Corrupt(_))),
                "{corrupt}"
            );
        }
    }
}
