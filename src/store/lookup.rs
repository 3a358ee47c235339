//! The ingest path's question to PostgreSQL — "is any of these dialogs, new to Redis,
//! granted or refused already?" — asked for many requests at once.
//!
//! Every first message of a dialog asks it (see `crate::ingest::stage`), so at volume it is asked
//! thousands of times a second. One query per request made PostgreSQL the bottleneck
//! (each planned on its own; a core of PostgreSQL for ~6.5k lookups/s, BENCHMARKS.md
//! "Ingest"). Here one task runs the queries, one at a time: the lookups that arrive while
//! a query runs wait for it and go together in the next, and a busy service starts at most
//! one query per millisecond ([`PACE`]), so that more go together: PostgreSQL's cost is
//! nearly all per query (pgbench here: 1 and 8 dialogs a query, the same queries/s), and
//! pacing halved its CPU per single POST on traffic that starts a dialog every fifth
//! request (2.7 → 1.4 µs, BENCHMARKS.md) for ≤ 1 ms more on a new dialog's first
//! message. An idle service answers a lone lookup at once.
//!
//! One query at a time means one stalled query (a lock, a half-open connection) holds up
//! the lookups behind it: each caller gives up after its 250 ms bound and stages its
//! dialog *unverified* (the flusher settles it), so the guarantees hold and only the
//! settling work grows. Up to four rounds at once was tried and measured slower on
//! traffic that starts a dialog with every request (14.5k–16.5k vs 19.5k requests/s,
//! same session: more, smaller queries), so it was not kept.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{Known, known_in};
use crate::domain::DialogId;

/// At most this many dialogs in one query; the rest wait for the next.
const MOST_DIALOGS: usize = 2_000;

/// Queries start at least this far apart (a lone lookup on an idle service goes at once).
const PACE: std::time::Duration = std::time::Duration::from_millis(1);

/// One waiting lookup: its dialogs and messageIds, and where its answer goes (`None`:
/// the query failed).
struct Lookup {
    dialogs: Vec<DialogId>,
    message_ids: Vec<(DialogId, String)>,
    answer: oneshot::Sender<Option<Known>>,
}

/// A handle on the lookup task; the task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(super) struct Lookups {
    queue: mpsc::UnboundedSender<Lookup>,
}

impl Lookups {
    /// Starts the task (on the current tokio runtime).
    pub(super) fn start(pool: PgPool) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, waiting));
        Self { queue }
    }

    /// What PostgreSQL holds of `dialogs` and `message_ids`; `None` when the query failed
    /// or the task is gone. Not bounded in time here: the caller bounds it.
    pub(super) async fn decided(&self, dialogs: Vec<DialogId>, message_ids: Vec<(DialogId, String)>) -> Option<Known> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Lookup {
                dialogs,
                message_ids,
                answer,
            })
            .ok()?;
        answered.await.ok().flatten()
    }
}

async fn run(pool: PgPool, mut waiting: mpsc::UnboundedReceiver<Lookup>) {
    let mut last_query: Option<tokio::time::Instant> = None;
    while let Some(first) = waiting.recv().await {
        // Busy: at most one query per PACE, so that more lookups go in each.
        if let Some(at) = last_query.filter(|at| at.elapsed() < PACE) {
            tokio::time::sleep_until(at + PACE).await;
        }
        last_query = Some(tokio::time::Instant::now());
        let mut batch = vec![first];
        let mut dialogs = batch[0].dialogs.len();
        while dialogs < MOST_DIALOGS {
            let Ok(next) = waiting.try_recv() else { break };
            dialogs += next.dialogs.len();
            batch.push(next);
        }
        // A waiter that gave up (its request timed out) is not asked about.
        batch.retain(|lookup| !lookup.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut all: Vec<DialogId> = batch.iter().flat_map(|l| l.dialogs.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        let mut pairs: Vec<(DialogId, String)> = batch.iter().flat_map(|l| l.message_ids.iter().cloned()).collect();
        pairs.sort_unstable();
        pairs.dedup();
        let found = match known_in(&pool, &all, &pairs).await {
            Ok(found) => Some(Arc::new(found)),
            Err(e) => {
                tracing::debug!(error = %crate::telemetry::chain(&e), "dialog lookup failed");
                None
            }
        };
        for lookup in batch {
            let answer = found.as_ref().map(|found| Known {
                dialogs: lookup
                    .dialogs
                    .iter()
                    .filter_map(|d| found.dialogs.get(d).map(|g| (*d, *g)))
                    .collect(),
                message_ids: lookup
                    .message_ids
                    .iter()
                    .filter_map(|k| found.message_ids.get(k).map(|seq| (k.clone(), *seq)))
                    .collect(),
            });
            let _ = lookup.answer.send(answer);
        }
    }
}
