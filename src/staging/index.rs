//! The customer index: which staged dialogs belong to a customer, per shard, so that an
//! erasure finds them without a scan of the keyspace ([`Staging::customer_dialogs`]), and
//! its sweep, which removes the members of dialogs gone ([`IndexSweep`]).
//!
//! Each shard's `<shard>:customers` is a sorted set of `<customer>:<dialog>` members, all
//! of score 0: one customer's dialogs are one lexicographic range (`ZRANGEBYLEX`), read
//! at a cost of the customer's own dialogs. ingest.lua adds a member when a dialog is
//! created and consent.lua when it revives one; a known dialog's message writes nothing
//! here, and the key has no expiry to keep up (BENCHMARKS.md, "Erasure and the audit:
//! what they cost"). A member outlives its dialog until the sweep reaches it.

use super::{Staging, StagingError};
use crate::domain::{CustomerId, DialogId};
use crate::staging::keys::{SHARDS, Shard};

/// Members a sweep call checks in one shard (one atomic script call of that many
/// `HGET`s: well under a millisecond of Redis).
const SWEEP_CHUNK: usize = 500;

/// Shards a sweep pass visits: with a pass every few seconds (the flusher role's
/// erasure loop), every shard's index is walked through again within minutes at most
/// for a million staged dialogs.
const SHARDS_PER_PASS: usize = 8;

impl Staging {
    /// The dialogs Redis holds indexed under `customer`, in every shard (one script call
    /// per slot group, at once): the staged dialogs an erasure must refuse. A dialog may
    /// be named that belongs to another customer by now; [`Staging::decide`] with
    /// `only_for` leaves such a one alone.
    pub async fn customer_dialogs(&self, customer: CustomerId) -> Result<Vec<DialogId>, StagingError> {
        let calls = self.keys.shard_groups().into_iter().map(|group| {
            let mut invocation = self.scripts.customer_dialogs.prepare_invoke();
            for shard in group {
                invocation
                    .key(self.keys.customer_index(shard))
                    .key(self.keys.earlier_customer_index(shard, customer.get()));
            }
            invocation.arg(customer.get());
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
        let mut invocation = self.scripts.index_sweep.prepare_invoke();
        invocation
            .key(self.keys.customer_index(shard))
            .arg(after.unwrap_or(""))
            .arg(count);
        let mut conn = self.conn.clone();
        let (last, removed): (String, u64) = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(((!last.is_empty()).then_some(last), removed))
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
