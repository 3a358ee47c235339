//! Group commit: callers that arrive while a batch runs wait, and the next batch takes
//! all of them — the group commit of a database's log. One task, fed by an unbounded
//! channel, waits for a first request, takes a [`Slot`] (at most `in_flight` batches run
//! at once), waits out the pace, drains whatever else is waiting up to a weight limit,
//! runs one async batch function on a task of its own, and answers each caller through
//! its oneshot. Three paths use it, each for throughput (BENCHMARKS.md names them):
//! `staging::coalesce` (single POSTs' script calls), `store::lookup` (PostgreSQL lookups
//! of dialogs new to Redis) and `staging::replication` (`WAIT` rounds).
//!
//! A caller costs what a channel hand-off costs: one oneshot and one send, then one
//! await; everything else is per batch.
//!
//! Behaviour, written down:
//! - **Order.** A batch holds its requests in arrival order, and [`GroupCommit::call`]
//!   answers each caller with the answer at its request's position.
//! - **Abandoned callers.** A caller that went away (its future dropped, so its receiver)
//!   before its batch started is left out of the batch; a batch of none does not run.
//! - **A failing batch** (`Err(e)`) answers every one of its callers `Err(e.clone())`.
//! - **A batch that does not answer** — it panicked, or returned fewer answers than
//!   requests — leaves its callers (the unanswered ones) with `None`.
//! - **Cancellation.** The batch runs on a task of its own: a caller that goes away
//!   cancels nothing the others wait for.
//! - **Shutdown.** The task ends once every [`GroupCommit`] handle is dropped (a waiting
//!   caller holds one) and the channel is empty; batches already started run to their
//!   end and answer. A call made when the task is gone (its runtime shut down) answers
//!   `None`. The batch function is owned by the task: it
//!   must not hold a handle of its own group commit, or the task keeps itself alive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

/// How a group commit gathers its batches.
#[derive(Debug, Clone, Copy)]
pub struct Settings<R> {
    /// Batches running at once (at least one).
    pub in_flight: usize,
    /// A batch stops taking requests once their weights add up to this (the first is
    /// always taken, so one request heavier than this still goes).
    pub most: usize,
    /// A request's weight: 1 to count requests, or what the batch's cost grows with.
    pub weight: fn(&R) -> usize,
    /// Batches start at least this far apart; `Duration::ZERO` for no pacing. A lone
    /// request on an idle group commit goes at once either way.
    pub pace: Duration,
}

/// A batch's place among the `in_flight` allowed: the next batch starts once one is
/// dropped. The batch function keeps it for as long as the next batch should wait (for
/// its whole run, as a rule; `staging::coalesce` gives it back before its replication
/// round).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// One waiting request, and where its answer goes.
struct Waiting<R, A, E> {
    request: R,
    answer: oneshot::Sender<Result<A, E>>,
}

/// The sending side; the task ends when every clone is dropped.
pub struct GroupCommit<R, A, E> {
    queue: mpsc::UnboundedSender<Waiting<R, A, E>>,
}

impl<R, A, E> Clone for GroupCommit<R, A, E> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<R, A, E> std::fmt::Debug for GroupCommit<R, A, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl<R, A, E> GroupCommit<R, A, E>
where
    R: Send + 'static,
    A: Send + 'static,
    E: Clone + Send + 'static,
{
    /// Starts the task on the current tokio runtime. `batch` gets a batch's requests, in
    /// arrival order, and its [`Slot`]; it answers one `A` per request, in that order, or
    /// one error for all of them.
    pub fn start<F, Fut>(settings: Settings<R>, batch: F) -> Self
    where
        F: FnMut(Vec<R>, Slot) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<A>, E>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(settings, batch, waiting));
        Self { queue }
    }

    /// Hands `request` to the next batch and waits for its answer: `None` when the task
    /// is gone or the batch ended without answering it. The queue is unbounded: what
    /// waits is bounded by the callers (dapi's `DAPI_MAX_IN_FLIGHT` requests at once).
    pub async fn call(&self, request: R) -> Option<Result<A, E>> {
        let (answer, answered) = oneshot::channel();
        self.queue.send(Waiting { request, answer }).ok()?;
        answered.await.ok()
    }
}

async fn run<R, A, E, F, Fut>(
    settings: Settings<R>,
    mut batch: F,
    mut waiting: mpsc::UnboundedReceiver<Waiting<R, A, E>>,
) where
    R: Send + 'static,
    A: Send + 'static,
    E: Clone + Send + 'static,
    F: FnMut(Vec<R>, Slot) -> Fut,
    Fut: Future<Output = Result<Vec<A>, E>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    let mut last_start: Option<Instant> = None;
    while let Some(first) = waiting.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if let Some(at) = last_start.filter(|at| at.elapsed() < settings.pace) {
            tokio::time::sleep_until(at + settings.pace).await;
        }
        if !settings.pace.is_zero() {
            last_start = Some(Instant::now());
        }
        // Whatever arrived while the slots were taken (or the pace waited) goes in this batch.
        let mut weight = (settings.weight)(&first.request);
        let mut items = vec![first];
        while weight < settings.most {
            let Ok(next) = waiting.try_recv() else { break };
            weight = weight.saturating_add((settings.weight)(&next.request));
            items.push(next);
        }
        items.retain(|waiting| !waiting.answer.is_closed());
        if items.is_empty() {
            continue;
        }
        let (requests, answers): (Vec<R>, Vec<_>) = items.into_iter().map(|w| (w.request, w.answer)).unzip();
        let done = batch(requests, Slot { _permit: slot });
        tokio::spawn(async move {
            match done.await {
                Ok(results) => {
                    for (answer, result) in answers.into_iter().zip(results) {
                        let _ = answer.send(Ok(result));
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::FutureExt;
    use futures_util::future::join_all;

    use super::*;

    fn settings(in_flight: usize, most: usize) -> Settings<u32> {
        Settings {
            in_flight,
            most,
            weight: |_| 1,
            pace: Duration::ZERO,
        }
    }

    /// The batches a group commit ran, each its requests in order.
    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A group commit that answers `request * 10` and records each batch it ran.
    fn recording(settings: Settings<u32>) -> (GroupCommit<u32, u32, String>, Batches) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let commit = GroupCommit::start(settings, move |requests: Vec<u32>, slot| {
            seen.lock().unwrap().push(requests.clone()); // allow: test code
            async move {
                let _slot = slot;
                Ok(requests.iter().map(|r| r * 10).collect())
            }
        });
        (commit, batches)
    }

    #[tokio::test]
    async fn callers_waiting_together_go_in_one_batch_in_arrival_order_each_with_its_own_answer() {
        let (commit, batches) = recording(settings(1, 64));
        let answers = join_all((0..5).map(|r| commit.call(r))).await;
        let answers: Vec<u32> = answers.into_iter().map(|a| a.unwrap().unwrap()).collect(); // allow: test code
        assert_eq!(answers, [0, 10, 20, 30, 40]);
        assert_eq!(*batches.lock().unwrap(), [vec![0, 1, 2, 3, 4]]); // allow: test code
    }

    #[tokio::test]
    async fn a_batch_takes_requests_until_their_weight_reaches_the_limit() {
        let (commit, batches) = recording(settings(1, 3));
        let answers = join_all((0..7).map(|r| commit.call(r))).await;
        assert!(answers.iter().all(|a| matches!(a, Some(Ok(_)))));
        assert_eq!(*batches.lock().unwrap(), [vec![0, 1, 2], vec![3, 4, 5], vec![6]]); // allow: test code
    }

    #[tokio::test]
    async fn a_failing_batch_answers_every_caller_its_error() {
        let commit: GroupCommit<u32, u32, String> =
            GroupCommit::start(settings(1, 64), |_, _| async { Err("no".to_owned()) });
        let answers = join_all((0..4).map(|r| commit.call(r))).await;
        assert!(answers.iter().all(|a| a == &Some(Err("no".to_owned()))), "{answers:?}");
    }

    #[tokio::test]
    async fn a_batch_that_does_not_answer_leaves_its_callers_none() {
        let commit: GroupCommit<u32, u32, String> = GroupCommit::start(settings(1, 64), |_, _| async { Ok(vec![7]) });
        let answers = join_all((0..3).map(|r| commit.call(r))).await;
        assert_eq!(answers, [Some(Ok(7)), None, None]);
    }

    #[tokio::test]
    async fn callers_that_went_away_before_their_batch_are_left_out_of_it() {
        let (gate, opened) = oneshot::channel::<()>();
        let opened = Arc::new(Mutex::new(Some(opened)));
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let commit: GroupCommit<u32, u32, String> = GroupCommit::start(settings(1, 64), move |requests, slot| {
            seen.lock().unwrap().push(requests.clone()); // allow: test code
            // The first batch holds its slot until the gate opens.
            let gate = opened.lock().unwrap().take(); // allow: test code
            async move {
                let _slot = slot;
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                Ok(requests)
            }
        });
        let first = tokio::spawn({
            let commit = commit.clone();
            async move { commit.call(0).await }
        });
        while batches.lock().unwrap().is_empty() {
            // allow: test code
            tokio::task::yield_now().await;
        }
        // Sent, then dropped while the first batch holds the slot.
        assert!(commit.call(1).now_or_never().is_none());
        let kept = tokio::spawn({
            let commit = commit.clone();
            async move { commit.call(2).await }
        });
        assert!(commit.call(3).now_or_never().is_none());
        tokio::task::yield_now().await;
        gate.send(()).unwrap(); // allow: test code
        assert_eq!(first.await.unwrap(), Some(Ok(0))); // allow: test code
        assert_eq!(kept.await.unwrap(), Some(Ok(2))); // allow: test code
        assert_eq!(*batches.lock().unwrap(), [vec![0], vec![2]]);
    }
}
