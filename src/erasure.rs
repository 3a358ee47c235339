//! Erasing a whole customer (`DELETE /customers/{customerId}`), and finishing every
//! erasure left pending.
//!
//! An erasure is recorded before anything is deleted (an `erasures` row, pending), so a
//! crash between any two steps leaves it pending, and the processes that run flushers
//! finish it ([`finish_pending`]). Each run of [`run`] is idempotent:
//!
//! 1. list the customer's dialogs: those Redis indexes under the customer (one script
//!    call per slot group, never a scan) and those PostgreSQL holds (an index range),
//!    Redis-forgotten ones included;
//! 2. refuse each in Redis first, reviving the ones Redis forgot, so that a racing
//!    message either came before the refusal (and is erased) or meets it (409), and the
//!    epoch bump fences any flush in flight;
//! 3. erase them in PostgreSQL in batches, each one transaction under the epoch fence
//!    with its audit events and the receipt's counts (`Store::erase_for`);
//! 4. wait for the read replica, as a refusal does; 5. complete the receipt and write the
//!    `customer_erased` event in one transaction.
//!
//! Cost: what the customer's own data costs — nothing here scans the keyspace or a table.

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{CustomerId, DialogId};
use crate::staging::{Choice, Decided, Revival, Staging, StagingError};
use crate::store::erasure::{Receipt, RefusedForErasure};
use crate::store::{Store, StoreError};
use crate::telemetry;

/// Dialogs refused in Redis, then erased in PostgreSQL, per batch (one transaction each).
const BATCH: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error("Redis could not be reached")]
    Staging(#[from] StagingError),
    #[error("PostgreSQL could not be reached")]
    Store(#[from] StoreError),
}

/// The erasures a task of this process is running: the loop that finishes pending ones
/// leaves them alone. (Another process running the same erasure at once is harmless:
/// every step is idempotent and the counts are kept by row locks, not by who runs.)
static RUNNING: std::sync::Mutex<Vec<Uuid>> = std::sync::Mutex::new(Vec::new());

/// Marks an erasure as running in this process while it lives.
struct Running(Uuid);

impl Running {
    fn start(id: Uuid) -> Option<Self> {
        let mut running = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if running.contains(&id) {
            return None;
        }
        running.push(id);
        Some(Self(id))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|id| *id != self.0);
    }
}

/// Runs erasure `receipt` to its end: every dialog of its customer refused and erased,
/// the replica waited for (at most `replica_wait`), the receipt completed.
pub async fn run(
    staging: &Staging,
    store: &Store,
    receipt: Receipt,
    replica_wait: Duration,
) -> Result<Receipt, ErasureError> {
    if receipt.is_completed() {
        return Ok(receipt);
    }
    // This process runs it already (a repeated DELETE, the loop): that run answers.
    let Some(_running) = Running::start(receipt.erasure_id) else {
        return Ok(receipt);
    };
    let customer = CustomerId::from_stored(receipt.customer_id);
    let in_redis = staging.customer_dialogs(customer).await?;
    let mut in_store = Vec::new();
    let mut after = -1;
    loop {
        let page = store.customer_dialogs(customer, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.get();
        in_store.extend(page);
    }
    let mut dialogs: Vec<(DialogId, bool)> = in_redis.iter().map(|&d| (d, false)).collect();
    dialogs.extend(in_store.iter().map(|&d| (d, true)));
    dialogs.sort_unstable();
    // A dialog both hold once, as one PostgreSQL holds (it may need reviving).
    dialogs.dedup_by(|later, first| {
        if later.0 == first.0 {
            first.1 |= later.1;
            true
        } else {
            false
        }
    });
    for chunk in dialogs.chunks(BATCH) {
        let mut refused = Vec::with_capacity(chunk.len());
        for &(dialog, held) in chunk {
            if let Some(r) = refuse_in_redis(staging, customer, dialog, held).await? {
                refused.push(r);
            }
        }
        if refused.is_empty() {
            continue;
        }
        store.erase_for(&receipt, &refused).await?;
        for r in &refused {
            // Lets the refused dialogs' keys expire; the flusher does it otherwise.
            if let Err(e) = staging.confirm_erasure(r.dialog, r.epoch).await {
                tracing::debug!(error = %telemetry::chain(&e), "could not confirm an erasure to Redis; the flusher will");
            }
        }
    }
    store.wait_for_replica(replica_wait).await?;
    let done = store.complete_erasure(receipt.erasure_id).await?;
    Ok(done)
}

/// Refuses `dialog` of `customer` in Redis; `held`: PostgreSQL holds it (revived when
/// Redis forgot it). `None`: nothing to erase (an index entry of a dialog that is no
/// longer the customer's, or gone).
async fn refuse_in_redis(
    staging: &Staging,
    customer: CustomerId,
    dialog: DialogId,
    held: bool,
) -> Result<Option<RefusedForErasure>, StagingError> {
    let mut decided = staging.decide(dialog, Choice::Refuse, None, Some(customer)).await?;
    if decided == Decided::Unknown && held {
        let revival = Revival::Unheld { customer };
        decided = staging
            .decide(dialog, Choice::Refuse, Some(revival), Some(customer))
            .await?;
    }
    Ok(match decided {
        Decided::Recorded(recorded) => Some(RefusedForErasure {
            dialog,
            epoch: recorded.epoch,
            decided_at_us: recorded.decided_at_us,
            staged_seqs: recorded.erased_staged,
            unwritten_grant: recorded.unwritten_grant,
        }),
        Decided::Unknown | Decided::OtherCustomer => None,
    })
}

/// Records the erasure of `customer` (or finds the pending one) and runs it on a task of
/// its own, so that a client that gives up does not cancel it. Waits for it at most
/// `bound`: `Ok(Ok(receipt))` completed; `Ok(Err(receipt))` still pending (past the
/// bound, or a store failed: the work goes on, or [`finish_pending`] finishes it).
pub async fn erase_customer(
    staging: &Staging,
    store: &Store,
    customer: CustomerId,
    replica_wait: Duration,
    bound: Duration,
) -> Result<Result<Receipt, Receipt>, ErasureError> {
    let started = std::time::Instant::now();
    let receipt = store
        .begin_erasure(customer, Uuid::now_v7(), OffsetDateTime::now_utc())
        .await?;
    let (staging_, store_, pending) = (staging.clone(), store.clone(), receipt.clone());
    let mut task = tokio::spawn(async move { run(&staging_, &store_, pending, replica_wait).await });
    let outcome = match tokio::time::timeout(bound, &mut task).await {
        Ok(Ok(Ok(done))) => Ok(done),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %telemetry::chain(&e), customer = customer.get(), "a customer erasure is left pending; dapi finishes it");
            Err(current(store, receipt).await)
        }
        Ok(Err(join)) => {
            tracing::error!(error = %join, "a customer erasure's task failed; dapi finishes it");
            Err(current(store, receipt).await)
        }
        Err(_) => Err(current(store, receipt).await),
    };
    let label = if outcome.is_ok() { "completed" } else { "pending" };
    metrics::counter!(telemetry::CUSTOMER_ERASURES, "outcome" => label).increment(1);
    metrics::histogram!(telemetry::CUSTOMER_ERASURE_DURATION).record(started.elapsed().as_secs_f64());
    Ok(outcome)
}

/// Records the erasure of `customer` in Redis, PostgreSQL being away, and refuses every
/// dialog Redis indexes under the customer at once, so that from now on they refuse new
/// messages and nothing more of them is flushed; PostgreSQL's part waits for
/// [`finish_pending`]. Returns the pending receipt.
pub async fn record_while_store_is_away(staging: &Staging, customer: CustomerId) -> Result<Receipt, StagingError> {
    let now = OffsetDateTime::now_utc();
    let now_us = crate::store::micros_of(now);
    let record = staging.record_erasure(customer, Uuid::now_v7(), now_us).await?;
    for dialog in staging.customer_dialogs(customer).await? {
        refuse_in_redis(staging, customer, dialog, false).await?;
    }
    Ok(Receipt {
        erasure_id: record.erasure_id,
        customer_id: customer.get(),
        status: "pending".to_owned(),
        dialogs: 0,
        messages: 0,
        requested_at: crate::store::time_of(record.requested_at_us),
        completed_at: None,
    })
}

/// The receipt as PostgreSQL holds it now (what was removed so far), else `fallback`.
async fn current(store: &Store, fallback: Receipt) -> Receipt {
    match store.receipt(fallback.erasure_id).await {
        Ok(Some(now)) => now,
        _ => fallback,
    }
}

/// Finishes every erasure left pending (a crash, an outage, a timeout): run by the
/// processes that run flushers, every few seconds. One a task of this process is running
/// is left to it. Returns how many are still pending.
pub async fn finish_pending(staging: &Staging, store: &Store, replica_wait: Duration) -> usize {
    // Erasures Redis kept while PostgreSQL was away: PostgreSQL records them first.
    match staging.erasure_records().await {
        Ok(records) => {
            for record in records {
                let at = crate::store::time_of(record.requested_at_us);
                match store.adopt_erasure(record.erasure_id, record.customer, at).await {
                    Ok(()) => {
                        if let Err(e) = staging.forget_erasure_record(&record).await {
                            tracing::debug!(error = %telemetry::chain(&e), "could not forget an erasure record PostgreSQL holds now");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %telemetry::chain(&e), "could not move an erasure record into PostgreSQL yet")
                    }
                }
            }
        }
        Err(e) => tracing::debug!(error = %telemetry::chain(&e), "could not read the erasure records in Redis"),
    }
    let pending = match store.pending_erasures().await {
        Ok(pending) => pending,
        Err(e) => {
            tracing::debug!(error = %telemetry::chain(&e), "could not read the pending erasures");
            return 0;
        }
    };
    let mut left = pending.len();
    let running: Vec<Uuid> = RUNNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for receipt in pending.into_iter().filter(|r| !running.contains(&r.erasure_id)) {
        let customer = receipt.customer_id;
        match run(staging, store, receipt, replica_wait).await {
            Ok(_) => {
                left -= 1;
                tracing::info!(customer, "finished a customer erasure left pending");
            }
            Err(e) => {
                tracing::warn!(error = %telemetry::chain(&e), customer, "a pending customer erasure could not finish yet")
            }
        }
    }
    metrics::gauge!(telemetry::CUSTOMER_ERASURES_PENDING).set(left as f64);
    left
}
