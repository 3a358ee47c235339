//! The flush queue: a Redis Stream per shard of "this dialog has something for
//! PostgreSQL" entries, each read through the consumer group [`GROUP`](super::GROUP).
//! Flushers own no shards: every flusher reads every shard's stream (see "Rounds").
//!
//! # Delivery
//!
//! At least once. An entry stays in its consumer's pending list until the finish script
//! acknowledges and deletes it, which the flusher calls only after its PostgreSQL commit.
//! A flusher that dies leaves its entries pending; another one takes them over with
//! `XAUTOCLAIM` once they have been idle for `DAPI_FLUSH_CLAIM_IDLE`. A flusher working
//! on a long batch keeps its entries alive ([`KeepAlive`]), so a slow PostgreSQL does not
//! make a second flusher run the same batch. Running an entry twice is harmless all the
//! same: messages are keyed by (dialog, seq) in PostgreSQL, and decisions are fenced by
//! their epoch.
//!
//! An entry names only a dialog, never what to write: the flusher reads the dialog's
//! current state in one atomic snapshot (a script), so a stale entry can never write
//! data that a later decision took back.
//!
//! # Consumers
//!
//! Every flusher task reads under a name of its own, unique to this start of this
//! process (`<host>-<pid>-<start>-<task>`): no two processes can ever share one, whatever
//! their host names. A dead consumer's entries are claimed after the idle time; consumers
//! idle for long with nothing pending are deleted ([`FlushQueue::prune_gone_consumers`]).
//!
//! # Rounds
//!
//! [`FlushQueue::next_entries`] first re-reads this consumer's own pending entries (after
//! a failed batch, so nothing waits for the claim timeout), then claims entries idle past
//! the timeout from other consumers (walking the pending list with `XAUTOCLAIM`'s cursor),
//! then reads new ones. On one Redis that is one `XREADGROUP` over every shard's stream,
//! blocking up to the block time; on a cluster a read cannot span slots, so the flusher
//! sweeps the shards without blocking, one after the other from where its last sweep
//! stopped, and rests briefly after a sweep that found nothing. A batch may hold entries
//! of several shards; its snapshot and finish run one script call per slot group. A lost
//! consumer group (a Redis restart without persistence) is created again on the
//! `NOGROUP` answer.
//!
//! # Dialogs that cannot be read
//!
//! The snapshot checks every field of every dialog. A dialog whose state dapi cannot
//! read (a decision it does not know, a message that does not decode) is reported as
//! [`Unreadable`]; the flusher sets it aside with [`FlushQueue::quarantine`] and flushes
//! the rest of its batch.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamClaimOptions, StreamId, StreamInfoConsumersReply,
    StreamReadOptions, StreamReadReply,
};
use redis::{Script, Value};
use tokio::time::Instant;

use super::{Connector, GROUP, Keyspace, RedisConn, SHARDS, Shard, StagingError, Timeouts, ttl_millis};
use crate::domain::{
    Audit, CustomerId, Decision, DialogId, DialogState, GrantToAudit, Refusal, StagedMessage, TakeBack,
};

/// How often a flusher looks for consumers that are gone.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a consumer with nothing pending must have been idle to count as gone.
pub const CONSUMER_GONE_AFTER: Duration = Duration::from_secs(300);
/// On a cluster, how long a flusher rests after a sweep over every shard found nothing
/// (or the block time, if shorter).
const IDLE_SWEEP_PAUSE: Duration = Duration::from_millis(100);

/// A consumer name unique to this start of this process and this flusher task.
pub fn unique_consumer_name(host: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static TASKS: AtomicU32 = AtomicU32::new(0);
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    });
    let task = TASKS.fetch_add(1, Ordering::Relaxed);
    format!("{host}-{}-{start:x}-{task}", std::process::id())
}

/// One flush-queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: String,
    /// `None` for an entry that names no dialog (not written by dapi): it is acknowledged
    /// and dropped.
    pub dialog: Option<i64>,
    /// The shard whose stream holds it.
    pub shard: Shard,
}

/// What a batch did for one dialog, for the finish script.
#[derive(Debug, Clone)]
pub struct Finished {
    pub dialog: i64,
    /// The life of the dialog the snapshot read: only its messages are trimmed.
    pub life: Life,
    /// The highest seq now safe to drop from Redis (0: none).
    pub last_seq: i64,
    /// How many messages the snapshot read.
    pub read: usize,
    /// The epoch of the refusal whose erasure PostgreSQL has now applied (0: none).
    pub erased_refusal: i64,
    /// A newer decision PostgreSQL holds, which Redis lost and must take back (see
    /// finish.lua).
    pub take_back: Option<TakeBack>,
}

/// A dialog of a snapshot whose state dapi cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub dialog: i64,
    /// Why, for the quarantine index and the log (never customer text).
    pub reason: &'static str,
    /// Only the staged messages are unreadable: the dialog's state (its decision) stays
    /// where ingest and consent find it, and only the messages are set aside.
    pub messages_only: bool,
}

/// The stamp of one life of a dialog in Redis: when Redis created its meta (µs, its field
/// `b`), read by the snapshot and carried to the claim and the finish of the batch, so
/// that neither touches a life Redis started since (a restart mid-batch, a revival).
/// Empty for a meta written before dapi stamped lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Life(pub String);

/// A granted dialog a flush is about to write, for [`FlushQueue::claim`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub dialog: i64,
    /// The life the snapshot read.
    pub life: &'a Life,
    pub customer: CustomerId,
    pub epoch: i64,
    /// The highest seq the batch writes, and how many messages.
    pub last_seq: i64,
    pub count: usize,
}

/// A dialog's state as the snapshot read it.
#[derive(Debug)]
pub enum Snapshot {
    /// Settled state, ready for PostgreSQL, and the life of the dialog it was read from.
    Ready(DialogState, Life),
    /// Staged while PostgreSQL could not be asked whether it holds the dialog: to be
    /// settled ([`FlushQueue::settle`]) before anything of it is written.
    Unverified(i64),
    Unreadable(Unreadable),
}

/// What PostgreSQL holds of an unverified dialog, for [`FlushQueue::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InStore {
    /// Nothing that still counts: the dialog is what Redis says.
    Nothing,
    /// A grant, with the last seq stored: the dialog's seqs continue after it.
    Granted { customer: CustomerId, last_seq: i64 },
    /// A refusal made within `DAPI_STAGING_TTL` (one Redis lost): a dialog still pending
    /// in Redis is refused, its staged messages deleted.
    Refused { customer: CustomerId },
}

/// How [`FlushQueue::settle`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done,
    /// PostgreSQL holds the dialog under another customer.
    CustomerDiffers,
    /// A staged message does not decode.
    Malformed,
}

/// One flusher task's handle on the flush queue, with its own connection (a blocking
/// read holds its connection; sharing it would stall everyone else). A self-reconnecting
/// connection of its own rather than a deadpool-redis pool: each task holds one
/// connection for its whole life, which is all a pool would give it.
pub struct FlushQueue {
    conn: RedisConn,
    keys: Keyspace,
    consumer: String,
    claim_idle: Duration,
    block: Duration,
    ttl_ms: u64,
    snapshot: Script,
    claim_seqs: Script,
    finish: Script,
    prune: Script,
    settle: Script,
    quarantine: Script,
    read_own_pending: bool,
    /// Entries read beyond the batch size (a read over many streams answers up to the
    /// count per stream): delivered to this consumer, handed out before reading more.
    ready: VecDeque<QueueEntry>,
    /// `XAUTOCLAIM`'s cursor per shard.
    claim_cursors: Vec<String>,
    last_claim: Option<Instant>,
    last_prune: Option<Instant>,
}

impl std::fmt::Debug for FlushQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushQueue")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// One `XREADGROUP` over the streams of a slot group's shards, from an id (`>` new
/// entries, `0` this consumer's pending ones), up to a count per stream; with a clone of
/// the queue's connection, so that reads can be made at once.
struct Reader {
    conn: RedisConn,
    keys: Keyspace,
    consumer: String,
}

impl Reader {
    async fn read(
        &mut self,
        shards: &[Shard],
        id: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<QueueEntry>, StagingError> {
        let streams: Vec<String> = shards.iter().map(|&s| self.keys.flush_stream(s)).collect();
        let ids = vec![id; streams.len()];
        let mut options = StreamReadOptions::default().group(GROUP, &self.consumer).count(count);
        if let Some(block) = block {
            options = options.block(usize::try_from(block.as_millis()).unwrap_or(1000));
        }
        let reply: Option<StreamReadReply> = self.conn.xread_options(&streams, &ids, &options).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .filter_map(|k| {
                let shard = self.keys.shard_of_stream(&k.key)?;
                Some(k.ids.into_iter().map(move |id| entry_of(shard, &id)))
            })
            .flatten()
            .collect())
    }
}

/// Keeps a batch's entries from looking idle while the batch is being worked on: a
/// cheap `XCLAIM … JUSTID` of the entries to their own consumer resets their idle time.
#[derive(Clone)]
pub struct KeepAlive {
    conn: RedisConn,
    keys: Keyspace,
    consumer: String,
    /// How often to touch the entries: well inside the claim idle time.
    pub every: Duration,
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAlive")
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

impl KeepAlive {
    /// One `XCLAIM` per shard the entries are in.
    pub async fn touch(&mut self, entries: &[QueueEntry]) -> Result<(), StagingError> {
        for (shard, ids) in ids_by_shard(entries) {
            let options = StreamClaimOptions::default().with_justid();
            let _: Value = self
                .conn
                .xclaim_options(self.keys.flush_stream(shard), GROUP, &self.consumer, 0, &ids, options)
                .await?;
        }
        Ok(())
    }
}

/// Entry ids grouped by shard, shards in ascending order.
fn ids_by_shard(entries: &[QueueEntry]) -> Vec<(Shard, Vec<String>)> {
    let mut groups: Vec<(Shard, Vec<String>)> = Vec::new();
    for e in entries {
        match groups.iter_mut().find(|(s, _)| *s == e.shard) {
            Some((_, ids)) => ids.push(e.id.clone()),
            None => groups.push((e.shard, vec![e.id.clone()])),
        }
    }
    groups.sort_by_key(|(s, _)| *s);
    groups
}

impl FlushQueue {
    pub fn new(
        connector: &Connector,
        keys: Keyspace,
        consumer: String,
        claim_idle: Duration,
        block: Duration,
        ttl: Duration,
    ) -> Result<Self, StagingError> {
        // A blocking read must be allowed to block (redis-rs #1924).
        let conn = connector.connect(Timeouts {
            connect: Duration::from_secs(1),
            response: block + Duration::from_secs(5),
        })?;
        Ok(Self {
            conn,
            keys: keys.for_cluster(connector.is_cluster()),
            consumer,
            claim_idle,
            block,
            ttl_ms: ttl_millis(ttl),
            snapshot: Script::new(include_str!("lua/snapshot.lua")),
            claim_seqs: Script::new(include_str!("lua/claim.lua")),
            finish: Script::new(include_str!("lua/finish.lua")),
            prune: Script::new(include_str!("lua/prune.lua")),
            settle: Script::new(include_str!("lua/settle.lua")),
            quarantine: Script::new(include_str!("lua/quarantine.lua")),
            read_own_pending: true,
            ready: VecDeque::new(),
            claim_cursors: vec!["0-0".into(); usize::from(SHARDS)],
            last_claim: None,
            last_prune: None,
        })
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Entries read and delivered to this consumer that wait for a later batch: a batch
    /// keeps them alive with its own, or a long batch would let another flusher claim
    /// them meanwhile.
    pub fn buffered(&self) -> impl Iterator<Item = &QueueEntry> {
        self.ready.iter()
    }

    /// A handle that keeps entries of this consumer alive while a batch runs.
    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive {
            conn: self.conn.clone(),
            keys: self.keys.clone(),
            consumer: self.consumer.clone(),
            every: (self.claim_idle / 3).max(Duration::from_millis(100)),
        }
    }

    /// The next entries for this consumer, at most `count`, from any shards: its own
    /// pending ones first, then entries of other consumers idle past the claim timeout,
    /// then new ones (waiting up to the block time). An empty answer means nothing
    /// arrived in that time.
    pub async fn next_entries(&mut self, count: usize) -> Result<Vec<QueueEntry>, StagingError> {
        match self.next_entries_once(count).await {
            Err(StagingError::Redis(e)) if e.code() == Some("NOGROUP") => {
                self.create_group().await?;
                self.next_entries_once(count).await
            }
            other => other,
        }
    }

    /// Up to `count` entries from `ready`.
    fn take_ready(&mut self, count: usize) -> Vec<QueueEntry> {
        let n = count.min(self.ready.len());
        self.ready.drain(..n).collect()
    }

    async fn next_entries_once(&mut self, count: usize) -> Result<Vec<QueueEntry>, StagingError> {
        let count = count.max(1);
        if !self.ready.is_empty() {
            return Ok(self.take_ready(count));
        }
        if self.read_own_pending {
            for group in self.keys.shard_groups() {
                let read = self.reader().read(&group, "0", count, None).await?;
                self.ready.extend(read);
            }
            if !self.ready.is_empty() {
                return Ok(self.take_ready(count));
            }
            self.read_own_pending = false;
        }

        if self.last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            self.last_prune = Some(Instant::now());
            let gone_after = CONSUMER_GONE_AFTER.max(self.claim_idle * 10);
            // Housekeeping only: a failure here must not hold up flushing.
            if let Err(e) = self.prune_gone_consumers(gone_after).await {
                tracing::debug!(error = %crate::telemetry::chain(&e), "could not prune gone consumers");
            }
        }

        if self.last_claim.is_none_or(|at| at.elapsed() >= self.claim_idle / 2) {
            let claimed = self.claim(count).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }

        let groups = self.keys.shard_groups();
        // A read answers up to its count per stream: a sixteenth of the batch from each
        // shard keeps a round's read within a few batches (the rest waits in `ready`,
        // delivered to this consumer and kept alive with each batch) however many shards
        // have work.
        let per_shard = count.div_ceil(16);
        if let [group] = groups.as_slice() {
            // One Redis: one blocking read over every shard's stream.
            let read = self.reader().read(group, ">", per_shard, Some(self.block)).await?;
            self.ready.extend(read);
            return Ok(self.take_ready(count));
        }
        // A cluster: a read may not span slots, and a blocking read per shard would
        // hold its node's connection. Read every shard at once without blocking (the
        // calls go to their nodes concurrently), and rest after a sweep that found
        // nothing.
        let reads = groups.iter().map(|group| {
            let mut queue = self.reader();
            let group = group.clone();
            async move { queue.read(&group, ">", per_shard, None).await }
        });
        for read in futures_util::future::join_all(reads).await {
            self.ready.extend(read?);
        }
        if self.ready.is_empty() {
            tokio::time::sleep(self.block.min(IDLE_SWEEP_PAUSE)).await;
        }
        Ok(self.take_ready(count))
    }

    /// A handle for one read of its own, for reads made at once.
    fn reader(&self) -> Reader {
        Reader {
            conn: self.conn.clone(),
            keys: self.keys.clone(),
            consumer: self.consumer.clone(),
        }
    }

    /// Claims entries idle past the claim timeout from other consumers: walks each
    /// shard's pending list with `XAUTOCLAIM`'s cursor, and rests until the next claim
    /// time once every cursor went round.
    async fn claim(&mut self, count: usize) -> Result<Vec<QueueEntry>, StagingError> {
        let idle = u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut claimed = Vec::new();
        for shard in 0..SHARDS {
            let cursor = &mut self.claim_cursors[usize::from(shard)];
            if claimed.len() >= count {
                break;
            }
            let reply: StreamAutoClaimReply = self
                .conn
                .xautoclaim_options(
                    self.keys.flush_stream(shard),
                    GROUP,
                    &self.consumer,
                    idle,
                    cursor.as_str(),
                    StreamAutoClaimOptions::default().count(count - claimed.len()),
                )
                .await?;
            *cursor = reply.next_stream_id;
            claimed.extend(reply.claimed.iter().map(|id| entry_of(shard, id)));
        }
        // "0-0": the cursor went round its pending list.
        if self.claim_cursors.iter().all(|c| c == "0-0") {
            self.last_claim = Some(Instant::now());
        }
        Ok(claimed)
    }

    /// Creates the consumer group (and the stream) of every shard where missing;
    /// reading from the start, so entries written before the group existed are not
    /// skipped.
    pub async fn create_group(&mut self) -> Result<(), StagingError> {
        for shard in 0..SHARDS {
            let created: Result<(), _> = self
                .conn
                .xgroup_create_mkstream(self.keys.flush_stream(shard), GROUP, "0")
                .await;
            match created {
                Err(e) if e.code() != Some("BUSYGROUP") => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes other consumers idle for longer than `gone_after` that hold no pending
    /// entry, shard by shard: each process start adds consumer names, and the groups
    /// would otherwise keep them all. Flushers call it every minute with
    /// [`CONSUMER_GONE_AFTER`] (or ten claim timeouts, if longer). Returns how many
    /// consumers were deleted (counted once per shard).
    pub async fn prune_gone_consumers(&mut self, gone_after: Duration) -> Result<usize, StagingError> {
        let mut deleted = 0;
        for shard in 0..SHARDS {
            let stream = self.keys.flush_stream(shard);
            let info: StreamInfoConsumersReply = match self.conn.xinfo_consumers(&stream, GROUP).await {
                Err(e) if e.code() == Some("NOGROUP") => continue,
                other => other?,
            };
            let gone: Vec<String> = info
                .consumers
                .into_iter()
                .filter(|c| c.pending == 0 && c.name != self.consumer && c.idle as u128 >= gone_after.as_millis())
                .map(|c| c.name)
                .collect();
            if gone.is_empty() {
                continue;
            }
            let mut invocation = self.prune.prepare_invoke();
            invocation.key(&stream).arg(GROUP).arg(&gone);
            let n: usize = invocation.invoke_async(&mut self.conn).await?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// Reads the state of `dialogs` atomically per slot group (the snapshot script: one
    /// call on one Redis, one per shard on a cluster), with at most `max_messages` per
    /// dialog and about `byte_budget` bytes of messages in all. Dialogs Redis no longer
    /// knows are left out; every other dialog is answered, as ready, unverified, or
    /// unreadable.
    pub async fn snapshot(
        &mut self,
        dialogs: &[i64],
        max_messages: usize,
        byte_budget: usize,
    ) -> Result<Vec<Snapshot>, StagingError> {
        let groups = super::by_slot_group(&self.keys, dialogs, |&d| d);
        // The budget is shared out between the calls, which run at once; the first
        // message of each call always fits, so a batch always moves on.
        let budget = (byte_budget / groups.len().max(1)).max(1);
        let calls = groups.iter().map(|(_, members)| {
            let mut invocation = self.snapshot.prepare_invoke();
            for &i in members {
                invocation
                    .key(self.keys.meta(dialogs[i]))
                    .key(self.keys.msgs(dialogs[i]));
            }
            invocation.arg(max_messages).arg(budget);
            let mut conn = self.conn.clone();
            // Raw values: one dialog's bad field must not fail the whole answer's decoding.
            async move { invocation.invoke_async::<Vec<Vec<Value>>>(&mut conn).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut out = Vec::with_capacity(dialogs.len());
        for ((_, members), replies) in groups.iter().zip(answers) {
            let replies = replies?;
            if replies.len() != members.len() {
                return Err(StagingError::Corrupt("snapshot reply has the wrong length"));
            }
            out.extend(
                members
                    .iter()
                    .zip(replies)
                    .filter_map(|(&i, fields)| read_snapshot(dialogs[i], &fields)),
            );
        }
        Ok(out)
    }

    /// Settles an unverified dialog with what PostgreSQL holds of it (`held`).
    pub async fn settle(&mut self, dialog: i64, held: InStore) -> Result<Settled, StagingError> {
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(self.keys.meta(dialog))
            .key(self.keys.msgs(dialog))
            .key(self.keys.ids(dialog));
        match held {
            InStore::Granted { customer, last_seq } => invocation.arg("g").arg(customer.get()).arg(last_seq),
            InStore::Refused { customer } => invocation.arg("r").arg(customer.get()).arg(0),
            InStore::Nothing => invocation.arg("").arg(0).arg(0),
        };
        invocation.arg(self.ttl_ms);
        let settled: i64 = invocation.invoke_async(&mut self.conn).await?;
        Ok(match settled {
            -1 => Settled::CustomerDiffers,
            -2 => Settled::Malformed,
            _ => Settled::Done,
        })
    }

    /// How long a dialog is remembered after its last write (`DAPI_STAGING_TTL`).
    pub fn staging_ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// Sets a dialog aside: its messages (and, unless `messages_only`, its state) move,
    /// unchanged, to the quarantine names and the reason is recorded in its shard's
    /// quarantine index (see docs/operations.md, "Quarantine").
    pub async fn quarantine(&mut self, dialog: i64, reason: &str, messages_only: bool) -> Result<(), StagingError> {
        let mut invocation = self.quarantine.prepare_invoke();
        invocation
            .key(self.keys.meta(dialog))
            .key(self.keys.msgs(dialog))
            .key(self.keys.quarantined_meta(dialog))
            .key(self.keys.quarantined_msgs(dialog))
            .key(self.keys.quarantine_index(Keyspace::shard_of(dialog)))
            .arg(dialog)
            .arg(reason)
            .arg(if messages_only { "msgs" } else { "all" });
        let _: i64 = invocation.invoke_async(&mut self.conn).await?;
        Ok(())
    }

    /// After the PostgreSQL commit: trims what was written, forgets refusals that are now
    /// erased, re-queues dialogs that still have messages, and acknowledges and deletes
    /// the entries. One script call per slot group (one on one Redis; the calls at
    /// once); a group that fails leaves its entries pending, to be run again (harmless:
    /// see the module doc).
    pub async fn finish(&mut self, done: &[Finished], entries: &[QueueEntry]) -> Result<(), StagingError> {
        let mut groups: Vec<Shard> = done
            .iter()
            .map(|f| self.keys.slot_group(Keyspace::shard_of(f.dialog)))
            .chain(entries.iter().map(|e| self.keys.slot_group(e.shard)))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let by_shard = ids_by_shard(entries);
        let calls = groups.into_iter().map(|group| {
            let dialogs: Vec<&Finished> = done
                .iter()
                .filter(|f| self.keys.slot_group(Keyspace::shard_of(f.dialog)) == group)
                .collect();
            let streams: Vec<&(Shard, Vec<String>)> = by_shard
                .iter()
                .filter(|(shard, _)| self.keys.slot_group(*shard) == group)
                .collect();
            let mut invocation = self.finish.prepare_invoke();
            for f in &dialogs {
                invocation
                    .key(self.keys.meta(f.dialog))
                    .key(self.keys.msgs(f.dialog))
                    .key(self.keys.quarantined_msgs(f.dialog))
                    .key(self.keys.flush_stream_of(f.dialog));
            }
            for (shard, _) in &streams {
                invocation.key(self.keys.flush_stream(*shard));
            }
            invocation.arg(GROUP).arg(dialogs.len()).arg(self.ttl_ms);
            for f in &dialogs {
                invocation
                    .arg(&f.life.0)
                    .arg(f.dialog)
                    .arg(f.last_seq)
                    .arg(f.read)
                    .arg(f.erased_refusal);
                match f.take_back {
                    None => invocation.arg("").arg(0).arg(0),
                    Some(TakeBack::Refusal { epoch }) => invocation.arg("r").arg(epoch).arg(0),
                    Some(TakeBack::Grant {
                        epoch,
                        erased_before_us,
                    }) => invocation.arg("g").arg(epoch).arg(erased_before_us),
                };
            }
            for (_, ids) in &streams {
                invocation.arg(ids.len()).arg(ids);
            }
            let mut conn = self.conn.clone();
            async move { invocation.invoke_async::<i64>(&mut conn).await }
        });
        for finished in futures_util::future::join_all(calls).await {
            finished?;
        }
        Ok(())
    }

    /// Claims a batch's granted dialogs inside its PostgreSQL transaction, before the
    /// commit (claim.lua): a dialog Redis forgot since the snapshot is written back as the
    /// snapshot read it, and one Redis started a new life of since gets seqs reserved for
    /// the batch's messages. Returns, per dialog to renumber, the seq its messages follow.
    pub async fn claim_seqs(&self, claims: &[Claim<'_>]) -> Result<HashMap<i64, i64>, StagingError> {
        let groups = super::by_slot_group(&self.keys, claims, |c| c.dialog);
        let calls = groups.iter().map(|(_, members)| {
            let mut invocation = self.claim_seqs.prepare_invoke();
            invocation.arg(self.ttl_ms);
            for &i in members {
                let c = &claims[i];
                invocation
                    .key(self.keys.meta(c.dialog))
                    .arg(&c.life.0)
                    .arg(c.customer.get())
                    .arg(c.epoch)
                    .arg(c.last_seq)
                    .arg(c.count);
            }
            let mut conn = self.conn.clone();
            async move { invocation.invoke_async::<Vec<i64>>(&mut conn).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut renumbered = HashMap::new();
        for ((_, members), after) in groups.iter().zip(answers) {
            let after = after?;
            if after.len() != members.len() {
                return Err(StagingError::Corrupt("claim reply has the wrong length"));
            }
            for (&i, after) in members.iter().zip(after) {
                if after > 0 {
                    renumbered.insert(claims[i].dialog, after);
                }
            }
        }
        Ok(renumbered)
    }

    /// Marks that this consumer has entries pending (after a failed batch), so that the
    /// next round retries them at once.
    pub fn retry_own_pending(&mut self) {
        self.read_own_pending = true;
        // They are among the pending entries the next round reads.
        self.ready.clear();
    }
}

/// One dialog of the snapshot script's answer: `{customer, decision, epoch, decided-at,
/// unerased refusal epoch, its decided-at, unverified, {messages}}`. `None` when Redis
/// no longer knows the dialog.
fn read_snapshot(dialog: i64, fields: &[Value]) -> Option<Snapshot> {
    let unreadable = |reason| {
        Some(Snapshot::Unreadable(Unreadable {
            dialog,
            reason,
            messages_only: false,
        }))
    };
    let [
        customer,
        decision,
        epoch,
        decided_at,
        refused,
        refused_at,
        unverified,
        messages,
        life,
        unwritten_grant,
    ] = fields
    else {
        return unreadable("the snapshot answer has the wrong shape");
    };
    if matches!(customer, Value::Nil) && matches!(decision, Value::Nil) {
        return None; // forgotten (expired) dialog
    }
    let Some(customer) = number(customer) else {
        return unreadable("customer id is not a number");
    };
    let Some(decision) = bytes(decision).and_then(Decision::from_letter) else {
        return unreadable("decision is not one dapi writes");
    };
    let Some(epoch) = number(epoch) else {
        return unreadable("epoch is not a number");
    };
    if bytes(unverified).is_some_and(|u| u == b"1") {
        return Some(Snapshot::Unverified(dialog));
    }
    let unerased_refusal = match (refused, refused_at) {
        (Value::Nil, _) => None,
        (epoch, at) => match (number(epoch), number(at)) {
            (Some(epoch), Some(decided_at_us)) => Some(Refusal { epoch, decided_at_us }),
            _ => return unreadable("unerased refusal is not a number"),
        },
    };
    let Value::Array(raw) = messages else {
        return Some(Snapshot::Unreadable(Unreadable {
            dialog,
            reason: "the staged messages are not a list",
            messages_only: true,
        }));
    };
    let Some(messages) = raw
        .iter()
        .map(|m| bytes(m).and_then(decode_message))
        .collect::<Option<Vec<_>>>()
    else {
        return Some(Snapshot::Unreadable(Unreadable {
            dialog,
            reason: "a staged message does not decode",
            messages_only: true,
        }));
    };
    let life = match life {
        Value::Nil => Life::default(),
        other => match bytes(other).and_then(|b| std::str::from_utf8(b).ok()) {
            Some(stamp) => Life(stamp.to_owned()),
            None => return unreadable("life stamp is not text"),
        },
    };
    let unwritten_grant = match unwritten_grant {
        Value::Nil => None,
        other => match bytes(other)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(GrantToAudit::parse)
        {
            Some(grant) => Some(grant),
            None => return unreadable("the grant awaiting its audit event is not one dapi writes"),
        },
    };
    Some(Snapshot::Ready(
        DialogState {
            audit: Audit {
                unwritten_grant,
                erased_staged: Vec::new(),
            },
            dialog: DialogId::from_stored(dialog),
            customer: CustomerId::from_stored(customer),
            decision,
            epoch,
            decided_at_us: number(decided_at).unwrap_or_default(),
            unerased_refusal,
            messages,
        },
        life,
    ))
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

/// Decodes `seq:receivedAt_µs:language:text` or `seq:receivedAt_µs:language|messageId|:text`
/// as the ingest script writes it.
fn decode_message(raw: &[u8]) -> Option<StagedMessage> {
    let mut parts = raw.splitn(3, |b| *b == b':');
    let mut number = || std::str::from_utf8(parts.next()?).ok()?.parse::<i64>().ok();
    let seq = number()?;
    let received_at_us = number()?;
    let rest = parts.next()?;
    let end = rest.iter().position(|b| *b == b':' || *b == b'|')?;
    let language = String::from_utf8(rest[..end].to_vec()).ok()?;
    let (message_id, text) = match rest[end] {
        b'|' => {
            let tail = &rest[end + 1..];
            let close = tail.iter().position(|b| *b == b'|')?;
            let text = tail[close + 1..].strip_prefix(b":")?;
            (Some(String::from_utf8(tail[..close].to_vec()).ok()?), text)
        }
        _ => (None, &rest[end + 1..]),
    };
    Some(StagedMessage {
        seq,
        received_at_us,
        language,
        text: String::from_utf8(text.to_vec()).ok()?,
        message_id,
    })
}

fn entry_of(shard: Shard, id: &StreamId) -> QueueEntry {
    QueueEntry {
        id: id.id.clone(),
        dialog: id.get::<i64>("d"),
        shard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_unique_per_task() {
        let (a, b) = (unique_consumer_name("h"), unique_consumer_name("h"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("h-{}-", std::process::id())));
    }

    #[test]
    fn staged_messages_decode_with_colons_in_the_text() {
        let m = decode_message(b"3:1795000000123456:pt-BR:a:b:c").expect("decodes"); // allow: test
        assert_eq!((m.seq, m.received_at_us), (3, 1_795_000_000_123_456));
        assert_eq!((m.language.as_str(), m.text.as_str()), ("pt-BR", "a:b:c"));
        assert!(decode_message(b"x:1:EN:t").is_none());
        assert!(decode_message(b"1:2:EN").is_none());
        let m = decode_message(b"4:5:EN|ab:c.1|:x|y:z").expect("decodes"); // allow: test
        assert_eq!((m.message_id.as_deref(), m.text.as_str()), (Some("ab:c.1"), "x|y:z"));
        assert!(decode_message(b"4:5:EN|open:x").is_none());
    }

    #[test]
    fn a_dialog_with_an_unknown_decision_is_unreadable_not_an_error() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let fields = [
            bulk("1"),
            bulk("?"),
            bulk("5"),
            bulk("6"),
            Value::Nil,
            Value::Nil,
            Value::Nil,
            Value::Array(vec![]),
        ];
        let Some(Snapshot::Unreadable(u)) = read_snapshot(7, &fields) else {
            panic!("not set aside");
        };
        assert_eq!(u.dialog, 7);
    }
}
