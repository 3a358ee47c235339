//! The customer index: which staged dialogs belong to a customer, per shard, so that an
//! erasure finds them without a scan of the keyspace ([`Staging::customer_dialogs`], in
//! `erasure.rs`), and its sweep, which removes the members of dialogs gone
//! ([`IndexSweep`]).
//!
//! Each shard's index is split in buckets by the customer id's last three characters
//! (`<shard>:customers:<bucket>`, [`customer_buckets`]): sorted sets of `<customer>:<dialog>`
//! members, all of score 0, so one customer's dialogs are one lexicographic range
//! (`ZRANGEBYLEX`) of one small set per shard, read at a cost of the customer's own
//! dialogs. ingest.lua adds a member when a dialog is created and consent.lua when it
//! revives one; a known dialog's message writes nothing here, and the sets have no expiry
//! to keep up (BENCHMARKS.md, "Erasure and the audit: what they cost"). A member outlives
//! its dialog until the sweep reaches it.

use super::wire::{
    self,
    index_sweep::{SweepChunk, Swept},
};
use super::{Staging, StagingError};
use crate::staging::keys::{SHARDS, Shard, customer_buckets};

/// Members a sweep call checks at most (one atomic script call of that many `HGET`s:
/// well under a millisecond of Redis).
const SWEEP_BUDGET: usize = 500;

/// Buckets a sweep call names at most.
const BUCKETS_PER_CALL: usize = 64;

/// Shards a sweep pass visits, one call each: with a pass every few seconds (the flusher
/// role's erasure loop), every bucket of every shard is walked through again within
/// minutes for a million staged dialogs (64 shards × 1,100 buckets).
const SHARDS_PER_PASS: usize = 16;

impl Staging {
    /// One sweep call in `shard`: from bucket `from` (its members after `after`), at
    /// most [`BUCKETS_PER_CALL`] buckets and [`SWEEP_BUDGET`] members, removing those whose
    /// dialog Redis no longer holds for that customer.
    async fn sweep_index_chunk(
        &self,
        shard: Shard,
        buckets: &[String],
        after: Option<&str>,
    ) -> Result<Swept, StagingError> {
        let cmd = SweepChunk {
            shard,
            buckets,
            after,
            budget: SWEEP_BUDGET,
        }
        .command(&self.keys);
        let mut conn = self.conn.clone();
        let reply = self
            .bounded(wire::run(&mut conn, &wire::index_sweep::SCRIPT, &cmd))
            .await?;
        Ok(wire::index_sweep::decode(reply, buckets.len()))
    }
}

/// Where the customer index's sweep stands: per shard, the bucket it is in and the member
/// to continue after, kept by the process that sweeps (a restart starts again from the
/// first bucket, which only repeats checks).
#[derive(Debug)]
pub struct IndexSweep {
    buckets: Vec<String>,
    cursors: Vec<(usize, Option<String>)>,
    next_shard: usize,
}

impl Default for IndexSweep {
    fn default() -> Self {
        Self {
            buckets: customer_buckets().collect(),
            cursors: vec![(0, None); usize::from(SHARDS)],
            next_shard: 0,
        }
    }
}

impl IndexSweep {
    /// One pass: a call in each of the next few shards. Returns how many members it
    /// removed. A Redis error ends the pass; the next one retries from the same place.
    pub async fn pass(&mut self, staging: &Staging) -> Result<u64, StagingError> {
        let mut removed = 0;
        for _ in 0..SHARDS_PER_PASS {
            let k = self.next_shard;
            let shard = Shard::try_from(k).expect("fewer than 2^16 shards");
            let (from, after) = self.cursors[k].clone();
            let chunk = &self.buckets[from..(from + BUCKETS_PER_CALL).min(self.buckets.len())];
            self.cursors[k] = match staging.sweep_index_chunk(shard, chunk, after.as_deref()).await? {
                Swept::All { removed: gone } => {
                    removed += gone;
                    let next = from + chunk.len();
                    (if next >= self.buckets.len() { 0 } else { next }, None)
                }
                Swept::Within {
                    bucket,
                    member,
                    removed: gone,
                } => {
                    removed += gone;
                    (from + bucket, Some(member))
                }
            };
            self.next_shard = (k + 1) % usize::from(SHARDS);
        }
        Ok(removed)
    }

    /// How many passes walk every bucket of every shard once, at least (for tests).
    pub fn passes_per_cycle(&self) -> usize {
        usize::from(SHARDS).div_ceil(SHARDS_PER_PASS) * self.buckets.len().div_ceil(BUCKETS_PER_CALL)
    }
}
