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
//! # Files
//!
//! `delivery` reads, claims and keeps alive this consumer's entries and prunes gone
//! consumers; `batch` runs a batch's scripts on its dialogs — the snapshot, the
//! settling of unverified dialogs, the quarantine, the claim before the commit and the
//! finish after it, which acknowledges the entries. Every script's call and reply are
//! typed in `staging::wire`.
//!
//! # Dialogs that cannot be read
//!
//! The snapshot checks every field of every dialog. A dialog whose state dapi cannot
//! read (a decision it does not know, a message that does not decode) is reported as
//! [`Unreadable`]; the flusher sets it aside with [`FlushQueue::quarantine`] and flushes
//! the rest of its batch.

mod batch;
mod delivery;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

pub use batch::{Claim, Finished, InStore, Life, Settled, Snapshot, Unreadable};
pub use delivery::{KeepAlive, unique_consumer_name};

use super::{Connector, Keyspace, RedisConn, SHARDS, Shard, StagingError, Timeouts, ttl_millis};
use crate::domain::DialogId;

/// One flush-queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: String,
    /// `None` for an entry that names no dialog (not written by dapi): it is acknowledged
    /// and dropped.
    pub dialog: Option<DialogId>,
    /// The shard whose stream holds it.
    pub shard: Shard,
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

    /// How long a dialog is remembered after its last write (`DAPI_STAGING_TTL`).
    pub fn staging_ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// Marks that this consumer has entries pending (after a failed batch), so that the
    /// next round retries them at once.
    pub fn retry_own_pending(&mut self) {
        self.read_own_pending = true;
        // They are among the pending entries the next round reads.
        self.ready.clear();
    }
}
