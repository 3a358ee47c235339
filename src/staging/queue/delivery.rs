//! Delivery: this consumer's entries read from the flush streams (its own pending ones,
//! others' claimed once idle, new ones), kept alive while a batch runs, and consumers
//! that are gone pruned from the group. See the module doc of `queue`.

use std::time::Duration;

use redis::AsyncCommands;
use redis::Value;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamClaimOptions, StreamId, StreamInfoConsumersReply,
    StreamReadOptions, StreamReadReply,
};
use tokio::time::Instant;

use super::{FlushQueue, QueueEntry};
use crate::domain::DialogId;
use crate::staging::wire::{self, prune::Prune};
use crate::staging::{GROUP, Keyspace, RedisConn, SHARDS, Shard, StagingError};

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
pub(super) fn ids_by_shard(entries: &[QueueEntry]) -> Vec<(Shard, Vec<String>)> {
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
    /// `CONSUMER_GONE_AFTER` (or ten claim timeouts, if longer). Returns how many
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
            let call = Prune {
                shard,
                consumers: &gone,
            };
            let n: usize = wire::run(&mut self.conn, &wire::prune::SCRIPT, &call.command(&self.keys)).await?;
            deleted += n;
        }
        Ok(deleted)
    }
}

fn entry_of(shard: Shard, id: &StreamId) -> QueueEntry {
    QueueEntry {
        id: id.id.clone(),
        dialog: id.get::<i64>("d").map(DialogId::from_stored),
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
}
