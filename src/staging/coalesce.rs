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
//! `store::lookup` does the same for the PostgreSQL lookups of dialogs new to Redis.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::replication::Replication;
use super::{Create, IngestOutcome, Keyspace, NewMessage, Staging, StagingError, by_slot_group};
use crate::domain::{CustomerId, DialogId, IncomingMessage};

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
    answer: oneshot::Sender<Result<IngestOutcome, StagingError>>,
}

/// The sending side; the task that makes the calls stops when every clone is gone.
#[derive(Clone)]
pub(super) struct Coalescer {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Coalescer {
    /// Starts the task on the current runtime. `staging` makes the calls: a handle
    /// without a coalescer of its own, or the task would keep itself alive.
    pub(super) fn start(staging: Staging) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(staging, waiting));
        Self { queue }
    }

    /// Stages one message, in a call with whatever else is waiting. The queue is
    /// unbounded: what waits is bounded by the requests dapi takes at once
    /// (`DAPI_MAX_IN_FLIGHT`).
    pub(super) async fn stage(&self, message: &NewMessage<'_>) -> Result<IngestOutcome, StagingError> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            customer: message.customer,
            dialog: message.dialog,
            message: message.message.clone(),
            create: message.create,
            answer,
        };
        self.queue.send(pending).map_err(|_| StagingError::Interrupted)?;
        // A call that ends without answering (its task panicked) staged nothing we know of.
        answered.await.unwrap_or(Err(StagingError::Interrupted))
    }
}

async fn run(mut staging: Staging, mut waiting: mpsc::UnboundedReceiver<Pending>) {
    // The calls do not wait for the replicas: `confirmed` does, after the slot is back.
    let replication = staging.replication.take();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever arrived while every slot was taken goes in this call.
        let mut items = vec![first];
        while items.len() < MAX_ITEMS {
            match waiting.try_recv() {
                Ok(pending) => items.push(pending),
                Err(_) => break,
            }
        }
        items.retain(|pending| !pending.answer.is_closed());
        if items.is_empty() {
            continue;
        }
        let staging = staging.clone();
        let replication = replication.clone();
        tokio::spawn(async move {
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
            let staged = match (staged, &replication) {
                (Ok(outcomes), Some(replication)) => {
                    Ok(confirmed(&staging.keys, replication, &messages, outcomes).await)
                }
                (staged, _) => staged,
            };
            drop(messages);
            match staged {
                Ok(outcomes) => {
                    for (pending, outcome) in items.into_iter().zip(outcomes) {
                        let _ = pending.answer.send(outcome);
                    }
                }
                Err(e) => {
                    for pending in items {
                        let _ = pending.answer.send(Err(e.clone()));
                    }
                }
            }
        });
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
