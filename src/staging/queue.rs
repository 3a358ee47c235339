//! The flush queue: a Redis Stream of "this dialog has something for PostgreSQL" entries,
//! read through the consumer group [`GROUP`](super::GROUP).
//!
//! # Delivery
//!
//! At least once. An entry stays in its consumer's pending list until the finish script
//! acknowledges and deletes it, which the flusher calls only after its PostgreSQL commit.
//! A flusher that dies leaves its entries pending; another one takes them over with
//! `XAUTOCLAIM` once they have been idle for `DAPI_FLUSH_CLAIM_IDLE`. Running an entry
//! twice is harmless: messages are keyed by (dialog, seq) in PostgreSQL, and the decision
//! is fenced by its epoch.
//!
//! An entry names only a dialog, never what to write: the flusher reads the dialog's
//! current state in one atomic snapshot (a script), so a stale entry can never write
//! data that a later decision took back.
//!
//! # Rounds
//!
//! [`FlushQueue::next_entries`] first re-reads this consumer's own pending entries (after
//! a failed batch, so nothing waits for the claim timeout), then claims entries idle past
//! the timeout from other consumers, then blocks for new ones. A lost consumer group (a
//! Redis restart without persistence) is created again on the `NOGROUP` answer.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamReadReply};
use redis::{Client, Script};

use super::{GROUP, Keyspace, StagingError};
use crate::domain::{CustomerId, Decision, DialogId, DialogState, StagedMessage};

/// How often a flusher looks for consumers that are gone.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a consumer with nothing pending must have been idle to count as gone.
pub const CONSUMER_GONE_AFTER: Duration = Duration::from_secs(300);

/// How long a consumer-slot lease lasts without renewal, and how often it is renewed.
const LEASE_TTL: Duration = Duration::from_secs(30);
const LEASE_RENEW: Duration = Duration::from_secs(5);
/// Consumer slots per host: flusher tasks of all dapi processes on one host.
const MAX_SLOTS: u32 = 256;

/// A leased consumer name.
#[derive(Debug)]
struct Lease {
    host: String,
    /// `pid:instance:task`: this process, this start of it, this flusher task.
    holder: String,
    key: Option<String>,
    renewed: Instant,
}

/// This process as a lease holder: its pid and a mark of this start, so that a restart
/// that gets the same pid (pid 1 in a container) is told apart from the old process.
fn process_instance() -> String {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            format!("{}:{nanos:x}", std::process::id())
        })
        .clone()
}

/// Whether the holder (`pid:instance:task`) of a slot on this host may still be running.
/// A task of this process is; an earlier process with this pid (a restarted container)
/// is not; another pid is alive while it is in `/proc`. Without `/proc`, every holder
/// counts as alive and its entries are taken over after the claim timeout instead.
fn holder_alive(holder: &str, me: &str) -> bool {
    let mut theirs = holder.split(':');
    let mut mine = me.split(':');
    let (pid, my_pid) = (theirs.next(), mine.next());
    if pid == my_pid {
        return theirs.next() == mine.next(); // same start of this process: alive
    }
    let Some(pid) = pid else {
        return true;
    };
    let proc = std::path::Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid).exists()
}

/// One flush-queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: String,
    /// `None` for an entry that names no dialog (not written by dapi): it is acknowledged
    /// and dropped.
    pub dialog: Option<i64>,
}

/// What a batch did for one dialog, for the finish script.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub dialog: i64,
    /// The highest seq now safe to drop from Redis (0: none).
    pub last_seq: i64,
    /// How many messages the snapshot read.
    pub read: usize,
}

/// One flusher task's handle on the flush queue, with its own connection (a blocking
/// read holds a connection; sharing it would stall everyone else).
pub struct FlushQueue {
    conn: ConnectionManager,
    keys: Keyspace,
    consumer: String,
    lease: Option<Lease>,
    claim_idle: Duration,
    block: Duration,
    snapshot: Script,
    finish: Script,
    prune: Script,
    lease_script: Script,
    read_own_pending: bool,
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

impl FlushQueue {
    pub fn new(
        client: Client,
        keys: Keyspace,
        consumer: String,
        claim_idle: Duration,
        block: Duration,
    ) -> Result<Self, StagingError> {
        // redis-rs times every call out after 500 ms by default; a blocking read must
        // be allowed to block (redis-rs #1924).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(block + Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Self {
            conn: ConnectionManager::new_lazy_with_config(client, config)?,
            keys,
            consumer,
            lease: None,
            claim_idle,
            block,
            snapshot: Script::new(include_str!("lua/snapshot.lua")),
            lease_script: Script::new(include_str!("lua/lease.lua")),
            finish: Script::new(include_str!("lua/finish.lua")),
            prune: Script::new(include_str!("lua/prune.lua")),
            read_own_pending: true,
            last_claim: None,
            last_prune: None,
        })
    }

    /// A queue that reads as `<host>:<slot>`, leasing the first slot of this host that is
    /// free or whose holder is gone: a process restarted on the same host (a container
    /// keeps its host name) gets its predecessor's name back, and with it that
    /// consumer's pending entries, at once rather than after the claim timeout.
    pub fn leased(
        client: Client,
        keys: Keyspace,
        host: String,
        claim_idle: Duration,
        block: Duration,
    ) -> Result<Self, StagingError> {
        let mut queue = Self::new(client, keys, String::new(), claim_idle, block)?;
        // One holder per queue (per flusher task): `pid:instance:task`.
        static TASKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let task = TASKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        queue.lease = Some(Lease {
            host,
            holder: format!("{}:{task}", process_instance()),
            key: None,
            renewed: Instant::now(),
        });
        Ok(queue)
    }

    /// Takes a consumer slot, or renews the one held (every [`LEASE_RENEW`]).
    async fn ensure_lease(&mut self) -> Result<(), StagingError> {
        let Some(lease) = &mut self.lease else {
            return Ok(()); // a fixed name
        };
        let ttl = u64::try_from(LEASE_TTL.as_millis()).unwrap_or(u64::MAX);
        if let Some(key) = &lease.key {
            if lease.renewed.elapsed() < LEASE_RENEW {
                return Ok(());
            }
            let mut renew = self.lease_script.prepare_invoke();
            renew.key(key).arg(&lease.holder).arg(ttl).arg(&lease.holder);
            let held: i64 = renew.invoke_async(&mut self.conn).await?;
            if held == 1 {
                lease.renewed = Instant::now();
                return Ok(());
            }
            tracing::warn!(consumer = %self.consumer, "lost the consumer lease; taking another");
            lease.key = None;
        }
        for slot in 0..MAX_SLOTS {
            let key = self.keys.consumer_lease(&lease.host, slot);
            let seen: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut self.conn).await?;
            if seen.as_deref().is_some_and(|h| holder_alive(h, &lease.holder)) {
                continue;
            }
            let mut take = self.lease_script.prepare_invoke();
            take.key(&key).arg(&lease.holder).arg(ttl).arg(seen.unwrap_or_default());
            let held: i64 = take.invoke_async(&mut self.conn).await?;
            if held == 1 {
                self.consumer = format!("{}:{slot}", lease.host);
                lease.key = Some(key);
                lease.renewed = Instant::now();
                self.read_own_pending = true;
                tracing::info!(consumer = %self.consumer, "flusher reads as this consumer");
                return Ok(());
            }
        }
        Err(StagingError::NoConsumerSlot)
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The next entries for this consumer: its own pending ones first, then entries of
    /// other consumers idle past the claim timeout, then new ones (blocking up to the
    /// block time). An empty answer means nothing arrived in that time.
    pub async fn next_entries(&mut self, count: usize) -> Result<Vec<QueueEntry>, StagingError> {
        match self.next_entries_once(count).await {
            Err(StagingError::Redis(e)) if e.code() == Some("NOGROUP") => {
                self.create_group().await?;
                self.next_entries_once(count).await
            }
            other => other,
        }
    }

    async fn next_entries_once(&mut self, count: usize) -> Result<Vec<QueueEntry>, StagingError> {
        self.ensure_lease().await?;
        let stream = self.keys.flush_stream();
        if self.read_own_pending {
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(&stream)
                .arg("0")
                .query_async(&mut self.conn)
                .await?;
            let entries = entries_of(reply);
            if !entries.is_empty() {
                return Ok(entries);
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

        let claim_due = self.last_claim.is_none_or(|at| at.elapsed() >= self.claim_idle / 2);
        if claim_due {
            self.last_claim = Some(Instant::now());
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX))
                .arg("0-0")
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn)
                .await?;
            if !reply.claimed.is_empty() {
                // More may be waiting; keep claiming next round.
                self.last_claim = None;
                return Ok(reply.claimed.iter().map(entry_of).collect());
            }
        }

        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(self.block.as_millis()).unwrap_or(1000))
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        Ok(entries_of(reply))
    }

    /// Creates the consumer group (and the stream) if missing; reading from the start,
    /// so entries written before the group existed are not skipped.
    pub async fn create_group(&mut self) -> Result<(), StagingError> {
        let created: Result<String, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.flush_stream())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Deletes other consumers idle for longer than `gone_after` that hold no pending
    /// entry: each process start adds a consumer name, and the group would otherwise keep
    /// them all. Flushers call it every minute with [`CONSUMER_GONE_AFTER`] (or ten claim
    /// timeouts, if longer). Returns how many were deleted.
    pub async fn prune_gone_consumers(&mut self, gone_after: Duration) -> Result<usize, StagingError> {
        let info: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.keys.flush_stream())
            .arg(GROUP)
            .query_async(&mut self.conn)
            .await?;
        let gone: Vec<String> = info
            .consumers
            .into_iter()
            .filter(|c| c.pending == 0 && c.name != self.consumer && c.idle as u128 >= gone_after.as_millis())
            .map(|c| c.name)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.prune.prepare_invoke();
        invocation.key(self.keys.flush_stream()).arg(GROUP).arg(&gone);
        let deleted: usize = invocation.invoke_async(&mut self.conn).await?;
        Ok(deleted)
    }

    /// Reads the state of `dialogs` in one atomic round trip (the snapshot script), with
    /// at most `max_messages` per dialog and about `byte_budget` bytes of messages in all.
    /// Dialogs Redis no longer knows are left out.
    pub async fn snapshot(
        &mut self,
        dialogs: &[i64],
        max_messages: usize,
        byte_budget: usize,
    ) -> Result<Vec<DialogState>, StagingError> {
        if dialogs.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.snapshot.prepare_invoke();
        for &d in dialogs {
            invocation.key(self.keys.meta(d)).key(self.keys.msgs(d));
        }
        invocation.arg(max_messages).arg(byte_budget);
        let replies: Vec<SnapshotReply> = invocation.invoke_async(&mut self.conn).await?;
        if replies.len() != dialogs.len() {
            return Err(StagingError::Corrupt("snapshot reply has the wrong length"));
        }
        let mut states = Vec::with_capacity(dialogs.len());
        for (&d, (customer, decision, epoch, decided_at_us, erased_through, msgs)) in dialogs.iter().zip(replies) {
            let (Some(customer), Some(decision), Some(epoch)) = (customer, decision, epoch) else {
                continue; // forgotten (expired) dialog
            };
            let decision = match decision.as_str() {
                "p" => Decision::Pending,
                "g" => Decision::Granted,
                "r" => Decision::Refused,
                _ => return Err(StagingError::Corrupt("dialog decision")),
            };
            let messages = msgs
                .iter()
                .map(|raw| decode_message(raw))
                .collect::<Option<Vec<_>>>()
                .ok_or(StagingError::Corrupt("staged message"))?;
            states.push(DialogState {
                dialog: DialogId::from_stored(d),
                customer: CustomerId::from_stored(customer),
                decision,
                epoch,
                decided_at_us: decided_at_us.unwrap_or_default(),
                erased_through: erased_through.unwrap_or_default(),
                messages,
            });
        }
        Ok(states)
    }

    /// After the PostgreSQL commit: trims what was written, re-queues dialogs that got
    /// more messages meanwhile, and acknowledges and deletes the entries. One script call.
    pub async fn finish(&mut self, done: &[Finished], entry_ids: &[String]) -> Result<(), StagingError> {
        let mut invocation = self.finish.prepare_invoke();
        invocation.key(self.keys.flush_stream());
        for f in done {
            invocation.key(self.keys.meta(f.dialog)).key(self.keys.msgs(f.dialog));
        }
        invocation.arg(GROUP).arg(done.len());
        for f in done {
            invocation.arg(f.dialog).arg(f.last_seq).arg(f.read);
        }
        for id in entry_ids {
            invocation.arg(id);
        }
        let _: i64 = invocation.invoke_async(&mut self.conn).await?;
        Ok(())
    }

    /// Marks that this consumer has entries pending (after a failed batch), so that the
    /// next round retries them at once.
    pub fn retry_own_pending(&mut self) {
        self.read_own_pending = true;
    }
}

/// Decodes `seq:receivedAt_µs:language:text` as the ingest script writes it.
fn decode_message(raw: &[u8]) -> Option<StagedMessage> {
    let mut parts = raw.splitn(4, |b| *b == b':');
    let mut number = || std::str::from_utf8(parts.next()?).ok()?.parse::<i64>().ok();
    let seq = number()?;
    let received_at_us = number()?;
    let language = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let text = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some(StagedMessage {
        seq,
        received_at_us,
        language,
        text,
    })
}

/// One dialog in the snapshot script's answer.
type SnapshotReply = (
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Vec<Vec<u8>>,
);

fn entries_of(reply: Option<StreamReadReply>) -> Vec<QueueEntry> {
    reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .map(|id| entry_of(&id))
        .collect()
}

fn entry_of(id: &StreamId) -> QueueEntry {
    QueueEntry {
        id: id.id.clone(),
        dialog: id.get::<i64>("d"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_holder_is_alive_if_it_is_this_process_or_a_running_one() {
        let me = format!("{}:abc:0", std::process::id());
        assert!(
            holder_alive(&format!("{}:abc:1", std::process::id()), &me),
            "another task of ours"
        );
        assert!(
            !holder_alive(&format!("{}:old:0", std::process::id()), &me),
            "an earlier start with our pid"
        );
        assert!(holder_alive("1:x:0", &me), "pid 1 runs");
        assert!(!holder_alive("4294967294:x:0", &me), "no such pid");
    }

    #[test]
    fn staged_messages_decode_with_colons_in_the_text() {
        let m = decode_message(b"3:1795000000123456:pt-BR:a:b:c").expect("decodes"); // allow: test
        assert_eq!((m.seq, m.received_at_us), (3, 1_795_000_000_123_456));
        assert_eq!((m.language.as_str(), m.text.as_str()), ("pt-BR", "a:b:c"));
        assert!(decode_message(b"x:1:EN:t").is_none());
        assert!(decode_message(b"1:2:EN").is_none());
    }
}
