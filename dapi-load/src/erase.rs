//! `--erase-rate`: customers erased while the traffic runs. Each erasure is one
//! `DELETE /customers/{customerId}` with the privacy token (resent after a timeout, a
//! broken connection or a 503 other than `erasure_pending`); a 503 `erasure_pending` is
//! followed by `GET /erasures/{erasureId}` every 20 ms until its receipt reads completed.
//! The check needs when each request was sent and when it was seen completed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Client, PATIENT, Reply, backoff};
use crate::record::{Cause, Endpoint, Record, Tally, new_histogram, percentile_ms};
use crate::worker::{Plan, Rng};

/// Where an erasure ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Answered 200, or its pending receipt read completed.
    Completed,
    /// Answered 503 `erasure_pending`, and its receipt never read completed.
    Pending,
    /// Answered with a status that records nothing (400, 401, 403 …).
    Rejected,
    /// No answer, or a last 503 that may or may not have recorded it: its effect unknown.
    Unknown,
}

/// One erasure as the check sees it.
#[derive(Debug, Clone)]
pub(crate) struct Erasure {
    pub(crate) customer: i64,
    /// When its request was first sent.
    pub(crate) sent: Instant,
    /// When it was seen completed: its 200 arrived, or its receipt read completed.
    pub(crate) completed: Option<Instant>,
    /// Whether it was first answered 503 `erasure_pending`.
    pub(crate) was_pending: bool,
    pub(crate) state: State,
}

impl Erasure {
    /// Whether dapi recorded it: everything of its customer acknowledged before it was
    /// sent must be gone.
    pub(crate) fn recorded(&self) -> bool {
        matches!(self.state, State::Completed | State::Pending)
    }
}

/// Erases `--erase-rate` customers a second until the deadline, each picked among the
/// customers a message was acknowledged for and not being erased at the moment; returns
/// every erasure and the `DELETE /customers` statistics.
pub(crate) async fn eraser(plan: Arc<Plan>, client: Arc<Client>) -> (Vec<Erasure>, Record) {
    let interval = Duration::from_secs_f64(1.0 / plan.args.erase_rate.max(1) as f64);
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut tasks: tokio::task::JoinSet<(Erasure, Record)> = tokio::task::JoinSet::new();
    let mut in_flight: HashSet<i64> = HashSet::new();
    let mut erasures = Vec::new();
    let mut record = Record::new();
    let mut next = Instant::now();
    loop {
        next += interval;
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= plan.deadline {
            break;
        }
        while let Some(joined) = tasks.try_join_next() {
            if let Ok((erasure, r)) = joined {
                in_flight.remove(&erasure.customer);
                erasures.push(erasure);
                record.merge(r);
            }
        }
        let candidates: Vec<i64> = plan
            .posted
            .iter()
            .enumerate()
            .filter(|(_, posted)| posted.load(Ordering::Relaxed))
            .map(|(i, _)| plan.customer_base + i as i64)
            .filter(|customer| !in_flight.contains(customer))
            .collect();
        let Some(&customer) = candidates.get(rng.below(candidates.len() as u64) as usize) else {
            continue;
        };
        in_flight.insert(customer);
        if let Ok(mut erased) = plan.erased.lock() {
            erased.insert(customer);
        }
        tasks.spawn(erase(plan.clone(), client.clone(), customer));
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((erasure, r)) = joined {
            erasures.push(erasure);
            record.merge(r);
        }
    }
    (erasures, record)
}

/// Erases `customer`; a pending erasure is polled until completed or until the deadline
/// plus `--settle`.
async fn erase(plan: Arc<Plan>, client: Arc<Client>, customer: i64) -> (Erasure, Record) {
    let mut record = Record::new();
    let mut tally = Tally::default();
    let path = format!("/customers/{customer}");
    let sent = Instant::now();
    let mut attempt = 0;
    let answer = loop {
        let cause = match client.privacy(&path, true, PATIENT).await {
            Reply::Answer(503, body) if body["code"] != "erasure_pending" && attempt < client.retries => {
                Cause::Unavailable
            }
            Reply::Answer(status, body) => break Some((status, body)),
            Reply::Failed(cause) if attempt < client.retries => cause,
            Reply::Failed(_) => break None,
        };
        attempt += 1;
        tally.note(cause);
        tokio::time::sleep(backoff(attempt)).await;
    };
    let answered = Instant::now();
    record.note(Endpoint::Erase, sent, answer.as_ref().map(|a| a.0), &tally);
    let mut erasure = Erasure {
        customer,
        sent,
        completed: None,
        was_pending: false,
        state: State::Unknown,
    };
    match answer {
        Some((200, _)) => {
            erasure.completed = Some(answered);
            erasure.state = State::Completed;
        }
        Some((503, body)) if body["code"] == "erasure_pending" => {
            erasure.was_pending = true;
            erasure.state = State::Pending;
            if let Some(id) = body["erasure"]["erasureId"].as_str() {
                erasure.completed = completion(&plan, &client, id).await;
                if erasure.completed.is_some() {
                    erasure.state = State::Completed;
                }
            }
        }
        Some((503, _)) | None => {}
        Some(_) => erasure.state = State::Rejected,
    }
    (erasure, record)
}

/// When the receipt `id` was first read completed; `None` if not by the deadline plus
/// `--settle`.
async fn completion(plan: &Plan, client: &Client, id: &str) -> Option<Instant> {
    let until = plan.deadline + plan.args.settle;
    let path = format!("/erasures/{id}");
    while Instant::now() < until {
        if let Reply::Answer(200, receipt) = client.privacy(&path, false, PATIENT).await
            && receipt["status"] == "completed"
        {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The summary's `erasures`: counts by outcome, and the latency from each request's send
/// until it was seen completed.
pub(crate) fn summary(erasures: &[Erasure]) -> Value {
    let mut latency = new_histogram();
    let count = |state: State| erasures.iter().filter(|e| e.state == state).count();
    for erasure in erasures {
        if let Some(done) = erasure.completed {
            let micros = u64::try_from(done.duration_since(erasure.sent).as_micros()).unwrap_or(u64::MAX);
            let _ = latency.record(micros.clamp(1, 60_000_000));
        }
    }
    json!({
        "requested": erasures.len(),
        "completed": count(State::Completed),
        "completed_after_pending": erasures.iter().filter(|e| e.was_pending && e.state == State::Completed).count(),
        "pending": count(State::Pending),
        "rejected": count(State::Rejected),
        "unanswered": count(State::Unknown),
        "p50_ms": percentile_ms(&latency, 0.50),
        "p90_ms": percentile_ms(&latency, 0.90),
        "p99_ms": percentile_ms(&latency, 0.99),
        "max_ms": latency.max() as f64 / 1000.0,
    })
}
