//! What a run saw: per-endpoint statistics, resends by cause, and each dialog's
//! outcome, which the loss check compares with what it reads back.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Endpoint {
    Ingest,
    Batch,
    /// Grants and refusals are reported apart: a grant is one Redis script call, a
    /// refusal also erases the dialog in PostgreSQL before it answers.
    Grant,
    Refuse,
    Read,
    /// `DELETE /customers/{customerId}` of `--erase-rate`: its first answer (200 or 503
    /// `erasure_pending`); the time until a pending one completed is in the erasure line.
    Erase,
    /// `GET /data/export` of `--export`: one sync step (its whole body read).
    Export,
}

impl Endpoint {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Endpoint::Ingest => "POST /data",
            Endpoint::Batch => "POST /data (batch)",
            Endpoint::Grant => "POST /consents (grant)",
            Endpoint::Refuse => "POST /consents (refuse)",
            Endpoint::Read => "GET /data",
            Endpoint::Erase => "DELETE /customers",
            Endpoint::Export => "GET /data/export",
        }
    }
}

/// Why a request was sent again.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cause {
    Timeout,
    Transport,
    Unavailable,
}

/// Resends, by cause.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Tally {
    timeout: u64,
    transport: u64,
    #[serde(rename = "503")]
    unavailable: u64,
}

impl Tally {
    pub(crate) fn note(&mut self, cause: Cause) {
        match cause {
            Cause::Timeout => self.timeout += 1,
            Cause::Transport => self.transport += 1,
            Cause::Unavailable => self.unavailable += 1,
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.timeout + self.transport + self.unavailable
    }

    pub(crate) fn add(&mut self, other: &Tally) {
        self.timeout += other.timeout;
        self.transport += other.transport;
        self.unavailable += other.unavailable;
    }
}

/// What one endpoint saw. A request is counted once, with its last answer, however
/// often it was resent; its latency runs until that answer.
pub(crate) struct Stats {
    pub(crate) latency: Histogram<u64>,
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// A batch's items, by their last status.
    pub(crate) item_statuses: BTreeMap<u16, u64>,
    /// Requests without an answer after all retries.
    pub(crate) errors: u64,
    /// Messages acknowledged (202), each once.
    pub(crate) messages: u64,
    /// 202s marked `"duplicate": true`: a resend whose first try had been staged.
    pub(crate) duplicates: u64,
    pub(crate) retries: Tally,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency: new_histogram(),
            statuses: BTreeMap::new(),
            item_statuses: BTreeMap::new(),
            errors: 0,
            messages: 0,
            duplicates: 0,
            retries: Tally::default(),
        }
    }

    fn merge(&mut self, other: Stats) {
        let _ = self.latency.add(&other.latency);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (status, n) in other.item_statuses {
            *self.item_statuses.entry(status).or_default() += n;
        }
        self.errors += other.errors;
        self.messages += other.messages;
        self.duplicates += other.duplicates;
        self.retries.add(&other.retries);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Granted,
    Refused,
    Undecided,
}

/// One acknowledged message: the `messageId` sent for it, when its request was first sent
/// (its scheduled time with `--rate`) and when its 202 arrived.
pub(crate) struct Acked {
    pub(crate) id: String,
    pub(crate) sent: Instant,
    pub(crate) at: Instant,
}

/// A dialog as the check sees it.
pub(crate) struct Outcome {
    pub(crate) customer: i64,
    /// Acknowledged seq → the message.
    pub(crate) acked: BTreeMap<i64, Acked>,
    pub(crate) fate: Fate,
    /// When its decision was sent and when it was answered, if it was.
    pub(crate) decision: Option<(Instant, Instant)>,
}

/// What one worker saw.
pub(crate) struct Record {
    pub(crate) endpoints: HashMap<Endpoint, Stats>,
    pub(crate) dialogs: HashMap<i64, Outcome>,
}

impl Record {
    pub(crate) fn new() -> Self {
        Self {
            endpoints: HashMap::new(),
            dialogs: HashMap::new(),
        }
    }

    /// One request of `endpoint`, from `started` until now; `status` its last answer.
    pub(crate) fn note(
        &mut self,
        endpoint: Endpoint,
        started: Instant,
        status: Option<u16>,
        retries: &Tally,
    ) -> &mut Stats {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let stats = self.endpoints.entry(endpoint).or_insert_with(Stats::new);
        let _ = stats.latency.record(micros.clamp(1, 60_000_000));
        match status {
            Some(status) => *stats.statuses.entry(status).or_default() += 1,
            None => stats.errors += 1,
        }
        stats.retries.add(retries);
        stats
    }

    pub(crate) fn merge(&mut self, other: Record) {
        for (endpoint, stats) in other.endpoints {
            match self.endpoints.get_mut(&endpoint) {
                Some(mine) => mine.merge(stats),
                None => {
                    self.endpoints.insert(endpoint, stats);
                }
            }
        }
        self.dialogs.extend(other.dialogs);
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable_histogram())
}

#[allow(clippy::expect_used)]
pub(crate) fn unreachable_histogram() -> Histogram<u64> {
    // allow: bounds 1 … 60 s with 3 digits are valid for hdrhistogram.
    Histogram::new(3).expect("a histogram with 3 significant digits") // allow: valid bounds
}

pub(crate) fn percentile_ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}
