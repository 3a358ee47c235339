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
//! message. An idle service answers a lone lookup at once. The gathering and pacing are
//! `crate::group_commit`'s.
//!
//! One query at a time means one stalled query (a lock, a half-open connection) holds up
//! the lookups behind it: each caller gives up after its 250 ms bound and stages its
//! dialog *unverified* (the flusher settles it), so the guarantees hold and only the
//! settling work grows. Up to four rounds at once was tried and measured slower on
//! traffic that starts a dialog with every request (14.5k–16.5k vs 19.5k requests/s,
//! same session: more, smaller queries), so it was not kept.

use sqlx::PgPool;

use super::{Known, known_in};
use crate::domain::DialogId;
use crate::group_commit::{GroupCommit, Settings, Slot};

/// At most this many dialogs in one query; the rest wait for the next.
const MOST_DIALOGS: usize = 2_000;

/// Queries start at least this far apart (a lone lookup on an idle service goes at once).
const PACE: std::time::Duration = std::time::Duration::from_millis(1);

/// One waiting lookup: its dialogs and messageIds.
struct Lookup {
    dialogs: Vec<DialogId>,
    message_ids: Vec<(DialogId, String)>,
}

/// A handle on the lookup task; the task ends when every handle is dropped. A failed
/// query answers every lookup in it `Err(())` (logged once, in [`query`]).
#[derive(Debug, Clone)]
pub(super) struct Lookups {
    queries: GroupCommit<Lookup, Known, ()>,
}

impl Lookups {
    /// Starts the task (on the current tokio runtime).
    pub(super) fn start(pool: PgPool) -> Self {
        let settings = Settings {
            in_flight: 1,
            most: MOST_DIALOGS,
            weight: |lookup: &Lookup| lookup.dialogs.len(),
            pace: PACE,
        };
        let queries = GroupCommit::start(settings, move |batch, slot| query(pool.clone(), batch, slot));
        Self { queries }
    }

    /// What PostgreSQL holds of `dialogs` and `message_ids`; `None` when the query failed
    /// or the task is gone. Not bounded in time here: the caller bounds it.
    pub(super) async fn decided(&self, dialogs: Vec<DialogId>, message_ids: Vec<(DialogId, String)>) -> Option<Known> {
        self.queries
            .call(Lookup { dialogs, message_ids })
            .await
            .and_then(Result::ok)
    }
}

/// One query for every lookup of `batch`, each answered what concerns it; the slot is
/// kept until the answers are made (one query at a time).
async fn query(pool: PgPool, batch: Vec<Lookup>, slot: Slot) -> Result<Vec<Known>, ()> {
    let _slot = slot;
    let mut all: Vec<DialogId> = batch.iter().flat_map(|l| l.dialogs.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    let mut pairs: Vec<(DialogId, String)> = batch.iter().flat_map(|l| l.message_ids.iter().cloned()).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let found = known_in(&pool, &all, &pairs).await.map_err(|e| {
        tracing::debug!(error = %crate::telemetry::chain(&e), "dialog lookup failed");
    })?;
    Ok(batch
        .iter()
        .map(|lookup| Known {
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
        })
        .collect())
}
