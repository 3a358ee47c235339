//! The customer index: which staged dialogs belong to a customer, per shard, so that an
//! erasure finds them without a scan of the keyspace ([`Staging::customer_dialogs`], in
//! `erasure.rs`), and its sweep, which removes the members of dialogs gone
//! ([`IndexSweep`]).
//!
//! Each shard's `<shard>:customers` is a sorted set of `<customer>:<dialog>` members, all
//! of score 0: one customer's dialogs are one lexicographic range (`ZRANGEBYLEX`), read
//! at a cost of the customer's own dialogs. ingest.lua adds a member when a dialog is
//! created and consent.lua when it revives one; a known dialog's message writes nothing
//! here, and the key has no expiry to keep up (BENCHMARKS.md, "Erasure and the audit:
//! what they cost"). A member outlives its dialog until the sweep reaches it.

use super::wire::{self, index_sweep::SweepChunk};
use super::{Staging, StagingError};
use crate::staging::keys::{SHARDS, Shard};

/// Members a sweep call checks in one shard (one atomic script call of that many
/// `HGET`s: well under a millisecond of Redis).
const SWEEP_CHUNK: usize = 500;

/// Shards a sweep pass visits: with a pass every few seconds (the flusher role's
/// erasure loop), every shard's index is walked through again within minutes at most
/// for a million staged dialogs.
const SHARDS_PER_PASS: usize = 8;

impl Staging {
    /// One sweep call: checks up to `count` members of `shard`'s index after `after`
    /// (`None`: from the start) and removes those whose dialog Redis no longer holds for
    /// that customer. Returns where to continue (`None`: the end was reached) and how many
    /// members it removed.
    async fn sweep_index_chunk(
        &self,
        shard: Shard,
        after: Option<&str>,
        count: usize,
    ) -> Result<(Option<String>, u64), StagingError> {
        let cmd = SweepChunk { shard, after, count }.command(&self.keys);
        let mut conn = self.conn.clone();
        let reply = self
            .bounded(wire::run(&mut conn, &wire::index_sweep::SCRIPT, &cmd))
            .await?;
        Ok(wire::index_sweep::decode(reply))
    }
}

/// Where the customer index's sweep stands: one cursor per shard, kept by the process
/// that sweeps (a restart starts each shard again from its first member, which only
/// repeats checks).
#[derive(Debug)]
pub struct IndexSweep {
    cursors: Vec<Option<String>>,
    next_shard: usize,
}

impl Default for IndexSweep {
    fn default() -> Self {
        Self {
            cursors: vec![None; usize::from(SHARDS)],
            next_shard: 0,
        }
    }
}

impl IndexSweep {
    /// One pass: a chunk of each of the next few shards. Returns how many members it
    /// removed. A Redis error ends the pass; the next one retries from the same place.
    pub async fn pass(&mut self, staging: &Staging) -> Result<u64, StagingError> {
        let mut removed = 0;
        for _ in 0..SHARDS_PER_PASS {
            let k = self.next_shard;
            let shard = Shard::try_from(k).expect("fewer than 2^16 shards");
            let (next, gone) = staging
                .sweep_index_chunk(shard, self.cursors[k].as_deref(), SWEEP_CHUNK)
                .await?;
            self.cursors[k] = next;
            removed += gone;
            self.next_shard = (k + 1) % usize::from(SHARDS);
        }
        Ok(removed)
    }
}
