//! The flusher: moves consented dialogs from Redis into PostgreSQL, and finishes
//! erasures that a refusal could not complete itself.
//!
//! One round ([`Flusher::flush_once`]):
//! 1. take a batch of flush-queue entries (own pending, then stale ones of dead
//!    consumers, then new ones);
//! 2. read the state of the batch's dialogs in one atomic Redis round trip; settle the
//!    ones staged while PostgreSQL could not be asked about them (and read them again),
//!    and set aside the ones that cannot be read (Guarantee 6);
//! 3. write them in one PostgreSQL transaction under the epoch fence ([`Store::apply`]),
//!    keeping the batch's entries alive meanwhile so no other flusher claims them;
//! 4. only after the commit: trim from Redis what the transaction wrote — only for
//!    dialogs whose upsert took; a fenced dialog keeps its messages and is queued again,
//!    unless PostgreSQL fenced it with a newer refusal, which Redis then takes back —
//!    forget refusals that are now erased, re-queue dialogs that got more messages
//!    meanwhile, acknowledge and delete the entries (one script call).
//!
//! A crash anywhere before step 4 only makes the batch run again, which the
//! (dialog, seq) key makes harmless. On errors nothing is acknowledged; the flusher
//! backs off (exponentially, capped) and retries its own pending entries, logging once
//! per change of state rather than once per retry.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Failpoint;
use crate::domain::{Decision, DialogId, DialogState};
use crate::staging::{Claim, Finished, FlushQueue, InStore, Life, QueueEntry, Settled, Snapshot, StagingError};
use crate::store::{Applied, Claiming, HeldDialog, Store, StoreError};
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

/// A batch taken from the queue, with the state of its dialogs.
#[derive(Debug)]
pub struct Batch {
    pub entries: Vec<QueueEntry>,
    pub states: Vec<DialogState>,
    /// The life of each dialog the snapshot read (see `staging::Life`).
    pub lives: HashMap<DialogId, Life>,
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
    failpoint: Option<Failpoint>,
}

impl Flusher {
    pub fn new(queue: FlushQueue, store: Store, batch_size: usize) -> Self {
        Self {
            queue,
            store,
            batch_size,
            failpoint: None,
        }
    }

    /// The fault tests' one hook (`DAPI_FAILPOINT`): with
    /// [`Failpoint::CrashAfterCommit`] the process aborts right after a batch's PostgreSQL
    /// commit and before its acknowledgement — the worst instant for a crash. Costs one
    /// branch per batch otherwise.
    pub fn with_failpoint(mut self, failpoint: Option<Failpoint>) -> Self {
        self.failpoint = failpoint;
        self
    }

    fn crash_here_if_asked(&self) {
        if self.failpoint == Some(Failpoint::CrashAfterCommit) {
            tracing::error!("DAPI_FAILPOINT=crash-after-commit: aborting after the commit, before the ack");
            std::process::abort();
        }
    }

    /// Steps 1 and 2: the next entries and their dialogs' state; `None` when idle.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, FlushError> {
        let entries = self.queue.next_entries(self.batch_size).await?;
        if entries.is_empty() {
            return Ok(None);
        }
        let mut dialogs: Vec<DialogId> = entries.iter().filter_map(|e| e.dialog).collect();
        dialogs.sort_unstable();
        dialogs.dedup();
        let mut states = Vec::with_capacity(dialogs.len());
        let mut lives = HashMap::with_capacity(dialogs.len());
        let mut unverified = Vec::new();
        let snapshots = self
            .queue
            .snapshot(&dialogs, MAX_MESSAGES_PER_DIALOG, BATCH_BYTE_BUDGET)
            .await?;
        self.sort(snapshots, &mut states, &mut lives, &mut unverified).await?;
        if !unverified.is_empty() {
            // One PostgreSQL lookup for all of them, then one settle call each.
            let decided = self.store.decided_dialogs(&unverified).await?;
            let remembered_since = time::OffsetDateTime::now_utc() - self.queue.staging_ttl();
            for &dialog in &unverified {
                let held = match decided.get(&dialog) {
                    Some(HeldDialog::Granted(granted)) => InStore::Granted(*granted),
                    // A refusal Redis lost, still remembered (as ingest's lookup judges).
                    Some(HeldDialog::Refused { customer, decided_at }) if *decided_at > remembered_since => {
                        InStore::Refused { customer: *customer }
                    }
                    _ => InStore::Nothing,
                };
                match self.queue.settle(dialog, held).await? {
                    // PostgreSQL is the authority on the customer: the dialog goes aside
                    // whole, and its next message meets PostgreSQL's customer (409).
                    Settled::CustomerDiffers => {
                        self.set_aside(dialog, "PostgreSQL holds the dialog under another customer", false)
                            .await?;
                    }
                    Settled::Malformed => self.set_aside(dialog, "a staged message does not decode", true).await?,
                    Settled::Done | Settled::NothingToSettle => {}
                }
            }
            // Settled now: read them again, in this batch. (One that is unverified
            // again was re-created meanwhile; its own queue entry brings it back.)
            let snapshots = self
                .queue
                .snapshot(&unverified, MAX_MESSAGES_PER_DIALOG, BATCH_BYTE_BUDGET)
                .await?;
            self.sort(snapshots, &mut states, &mut lives, &mut Vec::new()).await?;
        }
        Ok(Some(Batch { entries, states, lives }))
    }

    /// Sorts a snapshot's dialogs: ready ones to `states`, unverified ones to
    /// `unverified`; unreadable ones are set aside at once.
    async fn sort(
        &mut self,
        snapshots: Vec<Snapshot>,
        states: &mut Vec<DialogState>,
        lives: &mut HashMap<DialogId, Life>,
        unverified: &mut Vec<DialogId>,
    ) -> Result<(), FlushError> {
        for snapshot in snapshots {
            match snapshot {
                Snapshot::Ready(state, life) => {
                    lives.insert(state.dialog, life);
                    states.push(state);
                }
                Snapshot::Unverified(dialog) => unverified.push(dialog),
                Snapshot::Unreadable(u) => self.set_aside(u.dialog, u.reason, u.messages_only).await?,
            }
        }
        Ok(())
    }

    /// Moves a dialog the flusher cannot read out of the way, so that the rest of its
    /// batch goes on (Guarantee 6).
    async fn set_aside(
        &mut self,
        dialog: DialogId,
        reason: &'static str,
        messages_only: bool,
    ) -> Result<(), FlushError> {
        self.queue.quarantine(dialog, reason, messages_only).await?;
        metrics::counter!(telemetry::FLUSH_QUARANTINED).increment(1);
        tracing::error!(
            dialog = dialog.get(),
            reason,
            "set a dialog aside that the flusher cannot read; see README, \"Quarantine\""
        );
        Ok(())
    }

    /// Step 3: one PostgreSQL transaction for the whole batch. Its entries, and those
    /// read for the next batches, are kept alive meanwhile (their idle time reset), so
    /// however long PostgreSQL takes, no other flusher claims and runs them.
    pub async fn store_batch(&self, batch: &Batch) -> Result<Applied, FlushError> {
        let mut keep_alive = self.queue.keep_alive();
        let held: Vec<QueueEntry> = batch.entries.iter().chain(self.queue.buffered()).cloned().collect();
        // Inside the transaction, before the commit: no seq the batch writes may be handed
        // out again by a life of a dialog Redis started since the snapshot.
        let no_life = Life::UNSTAMPED;
        let claim = |claiming: Vec<Claiming>| {
            let queue = &self.queue;
            let lives = &batch.lives;
            let no_life = &no_life;
            let fut: futures_util::future::BoxFuture<'_, _> = Box::pin(async move {
                let claims: Vec<Claim<'_>> = claiming
                    .iter()
                    .map(|c| Claim {
                        dialog: DialogId::from_stored(c.dialog),
                        life: lives.get(&DialogId::from_stored(c.dialog)).unwrap_or(no_life),
                        customer: c.customer,
                        epoch: c.epoch,
                        last_seq: c.last_seq,
                        count: c.count,
                    })
                    .collect();
                match queue.claim_seqs(&claims).await {
                    Ok(renumbered) => Ok(renumbered.into_iter().map(|(d, after)| (d.get(), after)).collect()),
                    Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                }
            });
            fut
        };
        let write = self.store.apply_claiming(&batch.states, &claim);
        tokio::pin!(write);
        loop {
            tokio::select! {
                applied = &mut write => return Ok(applied?),
                () = tokio::time::sleep(keep_alive.every) => {
                    // Best effort: at worst another flusher runs the batch again, which
                    // the (dialog, seq) key and the fence make harmless.
                    if let Err(e) = keep_alive.touch(&held).await {
                        tracing::debug!(error = %telemetry::chain(&e), "could not keep the batch's entries alive");
                    }
                }
            }
        }
    }

    /// Step 4, after the commit: trim what was written, forget erased refusals,
    /// re-queue, acknowledge.
    pub async fn finish_batch(&mut self, batch: &Batch, applied: &Applied) -> Result<(), FlushError> {
        let done: Vec<Finished> = batch
            .states
            .iter()
            .map(|s| {
                let written = s.decision == Decision::Granted && applied.granted.contains(&s.dialog.get());
                let renumbered = applied.renumbered.contains(&s.dialog.get());
                Finished {
                    dialog: s.dialog,
                    life: batch.lives.get(&s.dialog).cloned().unwrap_or_default(),
                    written_up_to: if written && !renumbered {
                        s.messages.last().map(|m| m.seq)
                    } else {
                        None
                    },
                    read: s.messages.len(),
                    // The transaction committed: the refusal took (and erased), or
                    // PostgreSQL held a newer decision of this dialog, which erased it.
                    erased_refusal: if applied.deferred.contains(&s.dialog.get()) {
                        None
                    } else {
                        s.unerased_refusal.map(|r| r.epoch)
                    },
                    // A grant fenced by a newer decision in PostgreSQL: Redis lost that
                    // decision; without taking it back the dialog would be flushed and
                    // fenced again, for ever.
                    take_back: if s.decision == Decision::Granted && !written {
                        applied.newer_in_store.get(&s.dialog.get()).copied()
                    } else {
                        None
                    },
                }
            })
            .collect();
        self.queue.finish(&done, &batch.entries).await?;
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
            self.crash_here_if_asked();
            self.finish_batch(&batch, &applied).await?;
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
