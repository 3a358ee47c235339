//! A batch's scripts on its dialogs: the snapshot, the settling of unverified dialogs,
//! the quarantine, the claim before the PostgreSQL commit and the finish after it. Their
//! calls and replies are typed in `staging::wire`.

use std::collections::HashMap;

use redis::Value;

use super::delivery::ids_by_shard;
use super::{FlushQueue, QueueEntry};
use crate::domain::{CustomerId, DialogId, DialogState, GrantedDialog, TakeBack};
use crate::staging::wire::{
    self, claim::ClaimSeqs, finish::Finish, quarantine::Quarantine, settle::Settle, snapshot::TakeSnapshot,
};
use crate::staging::{Keyspace, Shard, StagingError, by_slot_group};

/// What a batch did for one dialog, for the finish script.
#[derive(Debug, Clone)]
pub struct Finished {
    pub dialog: DialogId,
    /// The life of the dialog the snapshot read: only its messages are trimmed.
    pub life: Life,
    /// The highest seq now safe to drop from Redis, if the batch wrote any.
    pub written_up_to: Option<i64>,
    /// How many messages the snapshot read.
    pub read: usize,
    /// The epoch of the refusal whose erasure PostgreSQL has now applied, if any.
    pub erased_refusal: Option<i64>,
    /// A newer decision PostgreSQL holds, which Redis lost and must take back (see
    /// finish.lua).
    pub take_back: Option<TakeBack>,
}

/// A dialog of a snapshot whose state dapi cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub dialog: DialogId,
    /// Why, for the quarantine index and the log (never customer text).
    pub reason: &'static str,
    /// Only the staged messages are unreadable: the dialog's state (its decision) stays
    /// where ingest and consent find it, and only the messages are set aside.
    pub messages_only: bool,
}

/// The stamp of one life of a dialog in Redis: when Redis created its meta (µs, its field
/// `b`), read by the snapshot and carried to the claim and the finish of the batch, so
/// that neither touches a life Redis started since (a restart mid-batch, a revival).
/// [`Life::UNSTAMPED`] for a meta that has no stamp.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Life(Option<String>);

impl Life {
    /// The life of a meta without a stamp.
    pub const UNSTAMPED: Life = Life(None);

    pub(in crate::staging) fn stamped(stamp: &str) -> Self {
        Life(Some(stamp.to_owned()))
    }

    /// As the scripts take it: the stamp, or `''` (their UNSTAMPED) for none.
    pub(in crate::staging) fn wire(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

/// A granted dialog a flush is about to write, for [`FlushQueue::claim_seqs`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub dialog: DialogId,
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
    Unverified(DialogId),
    Unreadable(Unreadable),
}

/// What PostgreSQL holds of an unverified dialog, for [`FlushQueue::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InStore {
    /// Nothing that still counts: the dialog is what Redis says.
    Nothing,
    /// A grant, with the last seq stored: the dialog's seqs continue after it.
    Granted(GrantedDialog),
    /// A refusal made within `DAPI_STAGING_TTL` (one Redis lost): a dialog still pending
    /// in Redis is refused, its staged messages deleted.
    Refused { customer: CustomerId },
}

/// How [`FlushQueue::settle`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done,
    /// Nothing to settle: settled already, or Redis forgot the dialog.
    NothingToSettle,
    /// PostgreSQL holds the dialog under another customer.
    CustomerDiffers,
    /// A staged message does not decode.
    Malformed,
}

impl FlushQueue {
    /// Reads the state of `dialogs` atomically per slot group (the snapshot script: one
    /// call on one Redis, one per shard on a cluster), with at most `max_messages` per
    /// dialog and about `byte_budget` bytes of messages in all. Dialogs Redis no longer
    /// knows are left out; every other dialog is answered, as ready, unverified, or
    /// unreadable.
    pub async fn snapshot(
        &mut self,
        dialogs: &[DialogId],
        max_messages: usize,
        byte_budget: usize,
    ) -> Result<Vec<Snapshot>, StagingError> {
        let groups = by_slot_group(&self.keys, dialogs, |d| d.get());
        // The budget is shared out between the calls, which run at once; the first
        // message of each call always fits, so a batch always moves on.
        let byte_budget = (byte_budget / groups.len().max(1)).max(1);
        let calls = groups.iter().map(|(_, members)| {
            let dialogs: Vec<DialogId> = members.iter().map(|&i| dialogs[i]).collect();
            let mut conn = self.conn.clone();
            let keys = &self.keys;
            async move {
                let call = TakeSnapshot {
                    dialogs: &dialogs,
                    max_messages,
                    byte_budget,
                };
                // Raw values: one dialog's bad field must not fail the whole answer's
                // decoding.
                let reply: Vec<Value> = wire::run(&mut conn, &wire::snapshot::SCRIPT, &call.command(keys)).await?;
                call.decode(reply)
            }
        });
        let mut out = Vec::with_capacity(dialogs.len());
        for answer in futures_util::future::join_all(calls).await {
            out.extend(answer?);
        }
        Ok(out)
    }

    /// Settles an unverified dialog with what PostgreSQL holds of it (`held`).
    pub async fn settle(&mut self, dialog: DialogId, held: InStore) -> Result<Settled, StagingError> {
        let call = Settle {
            dialog,
            held,
            ttl_ms: self.ttl_ms,
        };
        let reply: Value = wire::run(&mut self.conn, &wire::settle::SCRIPT, &call.command(&self.keys)).await?;
        wire::settle::decode(&reply)
    }

    /// Sets a dialog aside: its messages (and, unless `messages_only`, its state) move,
    /// unchanged, to the quarantine names and the reason is recorded in its shard's
    /// quarantine index (see docs/operations.md, "Quarantine").
    pub async fn quarantine(
        &mut self,
        dialog: DialogId,
        reason: &str,
        messages_only: bool,
    ) -> Result<(), StagingError> {
        let call = Quarantine {
            dialog,
            reason,
            messages_only,
        };
        let reply: Value = wire::run(&mut self.conn, &wire::quarantine::SCRIPT, &call.command(&self.keys)).await?;
        wire::quarantine::decode(&reply)?;
        Ok(())
    }

    /// After the PostgreSQL commit: trims what was written, forgets refusals that are now
    /// erased, re-queues dialogs that still have messages, and acknowledges and deletes
    /// the entries. One script call per slot group (one on one Redis; the calls at
    /// once); a group that fails leaves its entries pending, to be run again (harmless:
    /// see the module doc).
    pub async fn finish(&mut self, done: &[Finished], entries: &[QueueEntry]) -> Result<(), StagingError> {
        let group_of = |dialog: DialogId| self.keys.slot_group(Keyspace::shard_of(dialog.get()));
        let mut groups: Vec<Shard> = done
            .iter()
            .map(|f| group_of(f.dialog))
            .chain(entries.iter().map(|e| self.keys.slot_group(e.shard)))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let by_shard = ids_by_shard(entries);
        let calls = groups.into_iter().map(|group| {
            let dialogs: Vec<&Finished> = done.iter().filter(|f| group_of(f.dialog) == group).collect();
            let streams: Vec<&(Shard, Vec<String>)> = by_shard
                .iter()
                .filter(|(shard, _)| self.keys.slot_group(*shard) == group)
                .collect();
            let cmd = Finish {
                ttl_ms: self.ttl_ms,
                dialogs: &dialogs,
                entries: &streams,
            }
            .command(&self.keys);
            let mut conn = self.conn.clone();
            async move { wire::run::<i64>(&mut conn, &wire::finish::SCRIPT, &cmd).await }
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
    pub async fn claim_seqs(&self, claims: &[Claim<'_>]) -> Result<HashMap<DialogId, i64>, StagingError> {
        let groups = by_slot_group(&self.keys, claims, |c| c.dialog.get());
        let calls = groups.iter().map(|(_, members)| {
            let claims: Vec<&Claim<'_>> = members.iter().map(|&i| &claims[i]).collect();
            let mut conn = self.conn.clone();
            let keys = &self.keys;
            let ttl_ms = self.ttl_ms;
            async move {
                let call = ClaimSeqs {
                    ttl_ms,
                    claims: &claims,
                };
                let reply: Vec<Value> = wire::run(&mut conn, &wire::claim::SCRIPT, &call.command(keys)).await?;
                let after = call.decode(reply)?;
                Ok::<_, StagingError>(
                    claims
                        .iter()
                        .zip(after)
                        .filter_map(|(c, after)| Some((c.dialog, after?)))
                        .collect::<Vec<_>>(),
                )
            }
        });
        let mut renumbered = HashMap::new();
        for answer in futures_util::future::join_all(calls).await {
            renumbered.extend(answer?);
        }
        Ok(renumbered)
    }
}
