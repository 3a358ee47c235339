//! The flusher: moves consented dialogs from Redis into PostgreSQL, and finishes
//! erasures that a refusal could not complete itself.
//!
//! One round ([`Flusher::flush_once`]):
//! 1. take a batch of flush-queue entries (own pending, then stale ones of dead
//!    consumers, then new ones);
//! 2. read the state of the batch's dialogs in one atomic Redis round trip;
//! 3. write them in one PostgreSQL transaction under the epoch fence ([`Store::apply`]);
//! 4. only after the commit: trim what was written from Redis, re-queue dialogs that got
//!    more messages meanwhile, acknowledge and delete the entries (one script call).
//!
//! A crash anywhere before step 4 only makes the batch run again, which the
//! (dialog, seq) key makes harmless. On errors nothing is acknowledged; the flusher
//! backs off (exponentially, capped) and retries its own pending entries, logging once
//! per change of state rather than once per retry.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::{Decision, DialogState};
use crate::staging::{Finished, FlushQueue, QueueEntry, StagingError};
use crate::store::{Applied, Store, StoreError};
use crate::telemetry;

/// Most messages of one dialog written per batch; the rest follow in the next round.
pub const MAX_MESSAGES_PER_DIALOG: usize = 500;
/// About how many bytes of message text one batch reads and writes (the first message
/// always fits): keeps a batch of large texts within memory and PostgreSQL's limits.
pub const BATCH_BYTE_BUDGET: usize = 8 * 1024 * 1024;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The fault tests' one hook: with `DAPI_FAILPOINT=crash-after-commit` the process
/// aborts right after a batch's PostgreSQL commit and before its acknowledgement — the
/// worst instant for a crash. Read once; costs one branch per batch otherwise.
fn crash_here_if_asked() {
    static ASKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ASKED.get_or_init(|| std::env::var("DAPI_FAILPOINT").is_ok_and(|v| v == "crash-after-commit")) {
        tracing::error!("DAPI_FAILPOINT=crash-after-commit: aborting after the commit, before the ack");
        std::process::abort();
    }
}

/// A batch taken from the queue, with the state of its dialogs.
#[derive(Debug)]
pub struct Batch {
    pub entries: Vec<QueueEntry>,
    pub states: Vec<DialogState>,
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing arrived within the queue's block time.
    Idle,
    Flushed {
        entries: usize,
        applied: Applied,
    },
}

/// One flusher task: its own queue consumer and the shared store.
#[derive(Debug)]
pub struct Flusher {
    queue: FlushQueue,
    store: Store,
    batch_size: usize,
}

impl Flusher {
    pub fn new(queue: FlushQueue, store: Store, batch_size: usize) -> Self {
        Self {
            queue,
            store,
            batch_size,
        }
    }

    /// Steps 1 and 2: the next entries and their dialogs' state; `None` when idle.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, FlushError> {
        let entries = self.queue.next_entries(self.batch_size).await?;
        if entries.is_empty() {
            return Ok(None);
        }
        let mut dialogs: Vec<i64> = entries.iter().filter_map(|e| e.dialog).collect();
        dialogs.sort_unstable();
        dialogs.dedup();
        let states = self
            .queue
            .snapshot(&dialogs, MAX_MESSAGES_PER_DIALOG, BATCH_BYTE_BUDGET)
            .await?;
        Ok(Some(Batch { entries, states }))
    }

    /// Step 3: one PostgreSQL transaction for the whole batch.
    pub async fn store_batch(&self, batch: &Batch) -> Result<Applied, FlushError> {
        Ok(self.store.apply(&batch.states).await?)
    }

    /// Step 4, after the commit: trim, re-queue, acknowledge.
    pub async fn finish_batch(&mut self, batch: &Batch) -> Result<(), FlushError> {
        let done: Vec<Finished> = batch
            .states
            .iter()
            .map(|s| Finished {
                dialog: s.dialog.get(),
                last_seq: match s.decision {
                    Decision::Granted => s.messages.last().map_or(0, |m| m.seq),
                    Decision::Pending | Decision::Refused => 0,
                },
                read: s.messages.len(),
            })
            .collect();
        let ids: Vec<String> = batch.entries.iter().map(|e| e.id.clone()).collect();
        self.queue.finish(&done, &ids).await?;
        Ok(())
    }

    /// One round: take, write, finish.
    pub async fn flush_once(&mut self) -> Result<Outcome, FlushError> {
        let Some(batch) = self.next_batch().await? else {
            return Ok(Outcome::Idle);
        };
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            "flush_batch",
            entries = batch.entries.len(),
            dialogs = batch.states.len()
        );
        let applied = async {
            let applied = self.store_batch(&batch).await?;
            crash_here_if_asked();
            self.finish_batch(&batch).await?;
            tracing::debug!(
                inserted = applied.inserted,
                erased = applied.erased,
                fenced = applied.fenced,
                "batch flushed"
            );
            Ok::<_, FlushError>(applied)
        }
        .instrument(span)
        .await?;
        metrics::counter!(telemetry::FLUSH_BATCHES).increment(1);
        metrics::counter!(telemetry::FLUSHED_MESSAGES).increment(applied.inserted);
        metrics::counter!(telemetry::ERASED_MESSAGES).increment(applied.erased);
        metrics::histogram!(telemetry::FLUSH_BATCH_DURATION).record(started.elapsed().as_secs_f64());
        Ok(Outcome::Flushed {
            entries: batch.entries.len(),
            applied,
        })
    }

    /// Runs rounds until `shutdown` is cancelled. Cancellation is checked between rounds,
    /// never inside one, so a batch is never abandoned mid-transaction.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!("flusher started");
        let mut backoff = FIRST_BACKOFF;
        let mut failing = false;
        while !shutdown.is_cancelled() {
            match self.flush_once().await {
                Ok(_) => {
                    if failing {
                        tracing::info!(consumer = %self.queue.consumer(), "flusher recovered");
                        failing = false;
                    }
                    backoff = FIRST_BACKOFF;
                }
                Err(error) => {
                    let store = match error {
                        FlushError::Staging(_) => "redis",
                        FlushError::Store(_) => "postgres",
                    };
                    metrics::counter!(telemetry::STORE_ERRORS, "store" => store).increment(1);
                    if !failing {
                        tracing::warn!(consumer = %self.queue.consumer(), error = %telemetry::chain(&error), "flush failed; retrying with back-off");
                        failing = true;
                    }
                    self.queue.retry_own_pending();
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        tracing::info!(consumer = %self.queue.consumer(), "flusher stopped");
    }
}
