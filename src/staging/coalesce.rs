//! Single messages staged together: while the ingest script calls in flight are at
//! [`IN_FLIGHT`], the single POSTs that arrive wait, and the next call takes all of them
//! (up to [`MAX_ITEMS`]) — the group commit of a database's log. A lone message goes at
//! once; under load one call serves many requests, so Redis, whose one thread bounds a
//! single POST's throughput, parses, looks up and runs the script once per call rather
//! than once per message (a message in a call of many costs it about half what a call of
//! its own does: BENCHMARKS.md, "Single POSTs staged together").
//!
//! Nothing changes for a message's outcome: a call stages its items in arrival order, as
//! separate calls would have, each item with its own answer; a failed call fails each of
//! its items with the same error. The call runs on a task of its own, so a request that
//! goes away (a client's timeout) cancels nothing that other requests wait for; a message
//! whose request went away before its call is not staged (its client was answered 503
//! `request_timeout`, "may or may not have taken effect", or nothing).
//!
//! With `DAPI_REDIS_WAIT_REPLICAS`, a call's slot is given back once Redis has answered,
//! before the replicas confirm: the next call goes while this one's messages wait for
//! their replication round (a slow replica must not make single POSTs one call a round).
//!
//! The gathering is `crate::group_commit`'s; `store::lookup` and `staging::replication`
//! use it too, for the PostgreSQL lookups of dialogs new to Redis and the `WAIT` rounds.

use super::replication::Replication;
use super::{Create, IngestOutcome, Keyspace, NewMessage, Staging, StagingError, by_slot_group};
use crate::domain::{CustomerId, DialogId, IncomingMessage};
use crate::group_commit::{GroupCommit, Settings, Slot};

/// Single-message ingest calls in flight at once from one process; messages that arrive
/// meanwhile wait to go together. Measured with 64 connections (BENCHMARKS.md): 1 gave
/// the most requests/s (~20 messages a call), 2 and 4 fewer — a call is short next to
/// the time requests take to arrive, so a second slot only splits the waiting messages.
pub const IN_FLIGHT: usize = 1;

/// The most messages one call takes (Redis runs a call alone: about a millisecond at 64
/// on this project's machine, ~12 µs a message).
pub const MAX_ITEMS: usize = 64;

/// One message waiting for a call.
struct Pending {
    customer: CustomerId,
    dialog: DialogId,
    message: IncomingMessage,
    create: Create,
}

/// The sending side; the task that makes the calls stops when every clone is gone.
#[derive(Clone)]
pub(super) struct Coalescer {
    calls: GroupCommit<Pending, Result<IngestOutcome, StagingError>, StagingError>,
}

impl Coalescer {
    /// Starts the task on the current runtime. `staging` makes the calls: a handle
    /// without a coalescer of its own, or the task would keep itself alive.
    pub(super) fn start(mut staging: Staging) -> Self {
        // The calls do not wait for the replicas: `confirmed` does, after the slot is back.
        let replication = staging.replication.take();
        let settings = Settings {
            in_flight: IN_FLIGHT,
            most: MAX_ITEMS,
            weight: |_| 1,
            pace: std::time::Duration::ZERO,
        };
        let calls = GroupCommit::start(settings, move |items, slot| {
            call(staging.clone(), replication.clone(), items, slot)
        });
        Self { calls }
    }

    /// Stages one message, in a call with whatever else is waiting.
    pub(super) async fn stage(&self, message: &NewMessage<'_>) -> Result<IngestOutcome, StagingError> {
        let pending = Pending {
            customer: message.customer,
            dialog: message.dialog,
            message: message.message.clone(),
            create: message.create,
        };
        // A call that ends without answering (its task panicked) staged nothing we know of.
        match self.calls.call(pending).await {
            Some(Ok(outcome)) => outcome,
            Some(Err(e)) => Err(e),
            None => Err(StagingError::Interrupted),
        }
    }
}

/// One script call for `items`; the slot goes back once Redis has answered, before the
/// replicas are waited for.
async fn call(
    staging: Staging,
    replication: Option<Replication>,
    items: Vec<Pending>,
    slot: Slot,
) -> Result<Vec<Result<IngestOutcome, StagingError>>, StagingError> {
    let messages: Vec<NewMessage<'_>> = items
        .iter()
        .map(|p| NewMessage {
            customer: p.customer,
            dialog: p.dialog,
            message: &p.message,
            create: p.create,
        })
        .collect();
    let staged = staging.stage(&messages).await;
    drop(slot);
    match (staged, &replication) {
        (Ok(outcomes), Some(replication)) => Ok(confirmed(&staging.keys, replication, &messages, outcomes).await),
        (staged, _) => staged,
    }
}

/// Waits for the replicas to confirm a call's writes, one round per slot group (as
/// `Staging::stage` does for a call of its own); the messages of a group they do not
/// confirm get its error instead of their outcome.
async fn confirmed(
    keys: &Keyspace,
    replication: &Replication,
    messages: &[NewMessage<'_>],
    mut outcomes: Vec<Result<IngestOutcome, StagingError>>,
) -> Vec<Result<IngestOutcome, StagingError>> {
    let groups = by_slot_group(keys, messages, |m| m.dialog.get());
    let rounds = groups
        .iter()
        .map(|(_, members)| replication.confirm(Keyspace::shard_of(messages[members[0]].dialog.get())));
    for ((_, members), round) in groups.iter().zip(futures_util::future::join_all(rounds).await) {
        if let Err(e) = round {
            for &i in members {
                if outcomes[i].is_ok() {
                    outcomes[i] = Err(e.clone());
                }
            }
        }
    }
    outcomes
}
