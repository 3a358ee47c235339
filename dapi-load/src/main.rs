//! `dapi-load`: realistic traffic against any dapi, with a loss check at the end.
//!
//! Workers play chatbots: each runs dialogs — a few messages, then a grant, a refusal,
//! or no decision at all, and after a grant maybe a message more — for a handful of
//! customers of which a few are hot; a share of requests are analysts reading. With
//! `--batch 1` a worker runs one dialog at a time, one `POST /data/{customerId}/{dialogId}`
//! per message; with `--batch N` it sends `POST /data` batches of N messages, each
//! carrying several of its dialogs (each dialog's messages in order, consecutive), and
//! decides a dialog only once the batch holding its last message was answered. Every
//! message carries a `messageId` unique to the run; a request that times out, breaks or
//! is answered 503 is resent with the same body (the same `messageId`s), and so are just
//! the 503 items of a batch. Every 202 is recorded. At the end the run reads back,
//! through the API, every message of its own customers (IDs of this run only) and
//! checks: every acknowledged message of a granted dialog readable exactly once, under
//! the `messageId` it was sent with, and no `messageId` stored twice; nothing of a
//! refused or undecided dialog readable. Any loss, duplicate or leak makes it exit 1.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "dapi-load",
    version,
    about = "Load a dapi with realistic traffic, then check that nothing was lost"
)]
struct Args {
    /// Base URL of the dapi under test.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// How long to send traffic (`30s`, `5m`).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Requests per second in all (a batch, a consent and a read count one each; retries
    /// are not extra requests); 0 sends as fast as the workers can. With a rate, each
    /// request's latency counts from its scheduled send time, not from when it was
    /// actually sent, so time spent queued behind slow answers shows (no coordinated
    /// omission); without, from the actual send.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Concurrent workers (connections).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Messages per ingest request: 1 sends each as its own `POST /data/{customerId}/{dialogId}`;
    /// more sends `POST /data` batches of this many messages of several dialogs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Messages per dialog before its decision (each dialog gets 1 … 2×this).
    #[arg(long, default_value_t = 4)]
    messages: u64,
    /// Share of dialogs granted; `--refuse` are refused, the rest stay undecided.
    #[arg(long, default_value_t = 0.6)]
    grant: f64,
    #[arg(long, default_value_t = 0.3)]
    refuse: f64,
    /// Share of requests that are analysts' reads.
    #[arg(long, default_value_t = 0.05)]
    read: f64,
    /// Customers in play; the first few (a tenth) get half the dialogs.
    #[arg(long, default_value_t = 200)]
    customers: u64,
    /// Per-request timeout of the traffic (`5s`, `200ms`); the loss check's reads and the
    /// grant → readable probes wait up to 30 s.
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Resends of a request that timed out, broke or was answered 503 (and of a batch's
    /// 503 items), after 50 ms × attempt, with the same body and `messageId`s.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Bearer tokens, when the dapi has access configured.
    #[arg(long, env = "DAPI_LOAD_INGEST_TOKEN")]
    ingest_token: Option<String>,
    #[arg(long, env = "DAPI_LOAD_READ_TOKEN")]
    read_token: Option<String>,
    /// How long to wait for the flusher before the loss check.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    settle: Duration,
    /// Skip the loss check.
    #[arg(long)]
    no_check: bool,
    /// Share of granted dialogs whose time from the grant's answer until their messages
    /// are readable is measured (by polling GET /data every 20 ms).
    #[arg(long, default_value_t = 0.05)]
    probe: f64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    dapi::config::parse_duration(raw).ok_or_else(|| format!("not a duration: {raw}"))
}

fn parse_timeout(raw: &str) -> Result<Duration, String> {
    let timeout = parse_duration(raw)?;
    if timeout.is_zero() {
        return Err("a timeout must be at least 1ms".to_owned());
    }
    Ok(timeout)
}

/// The wait of the loss check's reads and of the probes, whatever `--timeout` says.
const PATIENT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Endpoint {
    Ingest,
    Batch,
    /// Grants and refusals are reported apart: a grant is one Redis script call, a
    /// refusal also erases the dialog in PostgreSQL before it answers.
    Grant,
    Refuse,
    Read,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Ingest => "POST /data",
            Endpoint::Batch => "POST /data (batch)",
            Endpoint::Grant => "POST /consents (grant)",
            Endpoint::Refuse => "POST /consents (refuse)",
            Endpoint::Read => "GET /data",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Granted,
    Refused,
    Undecided,
}

/// Why a request was sent again.
#[derive(Debug, Clone, Copy)]
enum Cause {
    Timeout,
    Transport,
    Unavailable,
}

/// Resends, by cause.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Tally {
    timeout: u64,
    transport: u64,
    #[serde(rename = "503")]
    unavailable: u64,
}

impl Tally {
    fn note(&mut self, cause: Cause) {
        match cause {
            Cause::Timeout => self.timeout += 1,
            Cause::Transport => self.transport += 1,
            Cause::Unavailable => self.unavailable += 1,
        }
    }

    fn total(&self) -> u64 {
        self.timeout + self.transport + self.unavailable
    }

    fn add(&mut self, other: &Tally) {
        self.timeout += other.timeout;
        self.transport += other.transport;
        self.unavailable += other.unavailable;
    }
}

/// What one endpoint saw. A request is counted once, with its last answer, however
/// often it was resent; its latency runs until that answer.
struct Stats {
    latency: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    /// A batch's items, by their last status.
    item_statuses: BTreeMap<u16, u64>,
    /// Requests without an answer after all retries.
    errors: u64,
    /// Messages acknowledged (202), each once.
    messages: u64,
    /// 202s marked `"duplicate": true`: a resend whose first try had been staged.
    duplicates: u64,
    retries: Tally,
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

/// A dialog as the check sees it.
struct Outcome {
    customer: i64,
    /// Acknowledged seq → the `messageId` sent for it.
    acked: BTreeMap<i64, String>,
    fate: Fate,
}

/// What one worker saw.
struct Record {
    endpoints: HashMap<Endpoint, Stats>,
    dialogs: HashMap<i64, Outcome>,
}

impl Record {
    fn new() -> Self {
        Self {
            endpoints: HashMap::new(),
            dialogs: HashMap::new(),
        }
    }

    /// One request of `endpoint`, from `started` until now; `status` its last answer.
    fn note(&mut self, endpoint: Endpoint, started: Instant, status: Option<u16>, retries: &Tally) -> &mut Stats {
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

    fn merge(&mut self, other: Record) {
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

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable_histogram())
}

#[allow(clippy::expect_used)]
fn unreachable_histogram() -> Histogram<u64> {
    // allow: bounds 1 … 60 s with 3 digits are valid for hdrhistogram.
    Histogram::new(3).expect("a histogram with 3 significant digits") // allow: valid bounds
}

/// A small, fast, deterministic-per-worker generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One try's outcome.
enum Reply {
    Answer(u16, Value),
    Failed(Cause),
}

/// One message's result: its status and, for a 202, its `seq` and whether it repeated.
#[derive(Debug, Clone, Copy)]
struct Staged {
    status: u16,
    seq: Option<i64>,
    duplicate: bool,
}

impl Staged {
    fn of(status: u16, answer: &Value) -> Self {
        Self {
            status,
            seq: if status == 202 { answer["seq"].as_i64() } else { None },
            duplicate: answer["duplicate"].as_bool() == Some(true),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50 * u64::from(attempt))
}

struct Client {
    http: reqwest::Client,
    url: String,
    ingest_token: Option<String>,
    read_token: Option<String>,
    /// Per-request timeout of the traffic, and resends after a timeout, a broken
    /// connection or a 503.
    timeout: Duration,
    retries: u32,
}

impl Client {
    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.url)
        }
    }

    /// One try: a POST of `body` with the ingest token, or a GET with the read token.
    async fn once(&self, url: &str, body: Option<&Value>, timeout: Duration) -> Reply {
        let (request, token) = match body {
            Some(body) => (self.http.post(url).json(body), &self.ingest_token),
            None => (self.http.get(url), &self.read_token),
        };
        let mut request = request.timeout(timeout);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let failed = |e: reqwest::Error| {
            Reply::Failed(if e.is_timeout() {
                Cause::Timeout
            } else {
                Cause::Transport
            })
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return failed(e),
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            Ok(bytes) => Reply::Answer(status, serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(e) => failed(e),
        }
    }

    /// A request, resent unchanged after a timeout, a broken connection or a 503, up to
    /// `retries` times; `None` when no try got an answer.
    async fn call(
        &self,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        retries: u32,
        tally: &mut Tally,
    ) -> Option<(u16, Value)> {
        let url = self.url(path);
        let mut attempt = 0;
        loop {
            let cause = match self.once(&url, body, timeout).await {
                Reply::Answer(503, _) if attempt < retries => Cause::Unavailable,
                Reply::Answer(status, answer) => return Some((status, answer)),
                Reply::Failed(cause) if attempt < retries => cause,
                Reply::Failed(_) => return None,
            };
            attempt += 1;
            tally.note(cause);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn post(&self, path: &str, body: &Value, tally: &mut Tally) -> Option<(u16, Value)> {
        self.call(path, Some(body), self.timeout, self.retries, tally).await
    }

    async fn get(&self, path: &str, tally: &mut Tally) -> Option<(u16, Value)> {
        self.call(path, None, self.timeout, self.retries, tally).await
    }

    /// `POST /data` of `items`, resent whole after a timeout, a broken connection or a
    /// 503, and with just its 503 items after a 200 that has some, up to `retries` times
    /// in all. Returns the last try's status (`None`: no answer) and each item's last
    /// result (`None`: never answered).
    async fn batch(&self, items: &[Value], tally: &mut Tally) -> (Option<u16>, Vec<Option<Staged>>) {
        let url = self.url("/data");
        let mut results: Vec<Option<Staged>> = vec![None; items.len()];
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut attempt = 0;
        loop {
            let body = json!({ "messages": pending.iter().map(|&i| &items[i]).collect::<Vec<_>>() });
            let (status, cause) = match self.once(&url, Some(&body), self.timeout).await {
                Reply::Answer(200, answer) => {
                    let answers = answer["results"].as_array();
                    let mut again = Vec::new();
                    for (k, &i) in pending.iter().enumerate() {
                        let Some(item) = answers.and_then(|a| a.get(k)) else {
                            continue;
                        };
                        let Some(status) = item["status"].as_u64().and_then(|s| u16::try_from(s).ok()) else {
                            continue;
                        };
                        results[i] = Some(Staged::of(status, item));
                        if status == 503 {
                            again.push(i);
                        }
                    }
                    if again.is_empty() {
                        return (Some(200), results);
                    }
                    pending = again;
                    (Some(200), Cause::Unavailable)
                }
                Reply::Answer(503, _) => (Some(503), Cause::Unavailable),
                Reply::Answer(status, _) => return (Some(status), results),
                Reply::Failed(cause) => (None, cause),
            };
            if attempt >= self.retries {
                return (status, results);
            }
            attempt += 1;
            tally.note(cause);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

struct Plan {
    args: Args,
    /// Grant → readable latencies (µs), and probes that gave up after 10 s.
    visibility: std::sync::Mutex<Histogram<u64>>,
    invisible: AtomicU64,
    /// First customer and dialog ID of this run: fresh IDs, so the check reads only them.
    customer_base: i64,
    dialog_base: i64,
    /// First part of every `messageId` of this run.
    run: String,
    next_dialog: AtomicU64,
    sent: AtomicU64,
    staged: AtomicU64,
    deadline: Instant,
}

/// Polls until `seq` of `dialog` is readable; records the time since `granted`.
async fn probe(plan: Arc<Plan>, client: Arc<Client>, customer: i64, dialog: i64, seq: i64, granted: Instant) {
    let url = client.url(&format!("/data/?customerId={customer}&pageSize=1000"));
    while granted.elapsed() < Duration::from_secs(10) {
        if let Reply::Answer(200, page) = client.once(&url, None, PATIENT).await {
            let found = page["results"].as_array().is_some_and(|results| {
                results
                    .iter()
                    .any(|m| m["dialogId"].as_i64() == Some(dialog) && m["seq"].as_i64() == Some(seq))
            });
            if found {
                let micros = u64::try_from(granted.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut histogram) = plan.visibility.lock() {
                    let _ = histogram.record(micros.clamp(1, 60_000_000));
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    plan.invisible.fetch_add(1, Ordering::Relaxed);
}

/// A dialog a worker is running.
struct Dialog {
    id: i64,
    customer: i64,
    fate: Fate,
    /// Messages before the decision: steps 0 … messages − 1. Step `messages` is the
    /// decision, step `messages + 1` the message after a grant, when there is one.
    messages: u64,
    after_grant: bool,
    /// Messages put into a request so far, and sent so far.
    queued: u64,
    sent: u64,
    /// Whether its decision was answered.
    decided: bool,
    acked: BTreeMap<i64, String>,
}

impl Dialog {
    fn outcome(self) -> Outcome {
        Outcome {
            customer: self.customer,
            acked: self.acked,
            // A decision never sent leaves the dialog undecided.
            fate: if self.decided { self.fate } else { Fate::Undecided },
        }
    }
}

/// One message of a dialog.
struct Message {
    dialog: i64,
    customer: i64,
    step: u64,
    id: String,
}

impl Message {
    fn new(plan: &Plan, dialog: &Dialog, step: u64) -> Self {
        Self {
            dialog: dialog.id,
            customer: dialog.customer,
            step,
            id: format!("{}-{}-{step}", plan.run, dialog.id),
        }
    }

    fn text(&self) -> String {
        format!("load message {} of dialog {}", self.step, self.dialog)
    }

    fn language(&self) -> &'static str {
        if self.step.is_multiple_of(3) { "EN" } else { "de" }
    }
}

struct Worker {
    plan: Arc<Plan>,
    client: Arc<Client>,
    rng: Rng,
    record: Record,
    probes: tokio::task::JoinSet<()>,
    /// Pace: each worker sends rate/concurrency requests per second.
    interval: Option<Duration>,
    next_send: Instant,
}

impl Worker {
    /// Waits for the next request's turn. Returns the instant its latency counts from —
    /// its scheduled send time with `--rate`, else now — or `None` past the deadline.
    async fn turn(&mut self) -> Option<Instant> {
        let started = match self.interval {
            Some(interval) => {
                self.next_send += interval;
                tokio::time::sleep_until(self.next_send.into()).await;
                self.next_send
            }
            None => Instant::now(),
        };
        (Instant::now() < self.plan.deadline).then_some(started)
    }

    /// The turn of a traffic request, now and then after an analyst's read (in a turn
    /// of its own).
    async fn turn_after_read(&mut self) -> Option<Instant> {
        if self.rng.chance(self.plan.args.read) {
            let started = self.turn().await?;
            self.read_once(started).await;
        }
        let started = self.turn().await?;
        self.plan.sent.fetch_add(1, Ordering::Relaxed);
        Some(started)
    }

    async fn read_once(&mut self, started: Instant) {
        let customer = self.plan.customer_base + self.rng.below(self.plan.args.customers) as i64;
        let query = match self.rng.below(4) {
            0 => "/data/?pageSize=100".to_owned(),
            1 => "/data/?language=en&pageSize=100".to_owned(),
            2 => format!("/data/?customerId={customer}"),
            _ => format!("/data/?cursor=&customerId={customer}&language=de"),
        };
        self.plan.sent.fetch_add(1, Ordering::Relaxed);
        let mut tally = Tally::default();
        let answer = self.client.get(&query, &mut tally).await;
        self.record.note(Endpoint::Read, started, answer.map(|a| a.0), &tally);
    }

    fn new_dialog(&mut self) -> Dialog {
        let args = &self.plan.args;
        let rng = &mut self.rng;
        let hot = (args.customers / 10).max(1);
        let id = self.plan.dialog_base + self.plan.next_dialog.fetch_add(1, Ordering::Relaxed) as i64;
        let customer = self.plan.customer_base
            + if rng.chance(0.5) {
                rng.below(hot)
            } else {
                rng.below(args.customers)
            } as i64;
        let fate = if rng.chance(args.grant) {
            Fate::Granted
        } else if rng.chance(args.refuse / (1.0 - args.grant).max(f64::EPSILON)) {
            Fate::Refused
        } else {
            Fate::Undecided
        };
        let messages = 1 + rng.below(2 * args.messages.max(1));
        let after_grant = fate == Fate::Granted && rng.below(2) == 1;
        Dialog {
            id,
            customer,
            fate,
            messages,
            after_grant,
            queued: 0,
            sent: 0,
            decided: false,
            acked: BTreeMap::new(),
        }
    }

    /// Sends `messages` — one POST, or one batch — and returns each one's result.
    async fn ingest(&mut self, messages: &[Message], started: Instant) -> Vec<Option<Staged>> {
        let mut tally = Tally::default();
        if let [message] = messages
            && self.plan.args.batch == 1
        {
            let body = json!({"text": message.text(), "language": message.language(), "messageId": message.id});
            let path = format!("/data/{}/{}", message.customer, message.dialog);
            let answer = self.client.post(&path, &body, &mut tally).await;
            self.record
                .note(Endpoint::Ingest, started, answer.as_ref().map(|a| a.0), &tally);
            return vec![answer.map(|(status, reply)| Staged::of(status, &reply))];
        }
        let items: Vec<Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "customerId": m.customer,
                    "dialogId": m.dialog,
                    "text": m.text(),
                    "language": m.language(),
                    "messageId": m.id,
                })
            })
            .collect();
        let (status, results) = self.client.batch(&items, &mut tally).await;
        let stats = self.record.note(Endpoint::Batch, started, status, &tally);
        for result in results.iter().flatten() {
            *stats.item_statuses.entry(result.status).or_default() += 1;
        }
        results
    }

    /// Sends the dialog's decision; whether it was answered as done.
    async fn decide(&mut self, dialog: &Dialog, started: Instant) -> bool {
        let approved = dialog.fate == Fate::Granted;
        let mut tally = Tally::default();
        let answer = self
            .client
            .post(
                &format!("/consents/{}", dialog.id),
                &json!({ "approved": approved }),
                &mut tally,
            )
            .await;
        let endpoint = if approved { Endpoint::Grant } else { Endpoint::Refuse };
        let status = answer.map(|a| a.0);
        self.record.note(endpoint, started, status, &tally);
        matches!(status, Some(200 | 202))
    }

    async fn run(mut self) -> Record {
        let batch = usize::try_from(self.plan.args.batch).unwrap_or(1);
        // Dialogs in play; the one whose messages before the decision are not all
        // queued yet; granted dialogs whose message after the grant waits for a request.
        let mut live: HashMap<i64, Dialog> = HashMap::new();
        let mut filling: Option<i64> = None;
        let mut after_grant: VecDeque<i64> = VecDeque::new();
        'run: loop {
            let mut messages: Vec<Message> = Vec::with_capacity(batch);
            while messages.len() < batch {
                if let Some(id) = after_grant.pop_front() {
                    if let Some(dialog) = live.get(&id) {
                        messages.push(Message::new(&self.plan, dialog, dialog.messages + 1));
                    }
                    continue;
                }
                let id = match filling {
                    Some(id) => id,
                    None => {
                        let dialog = self.new_dialog();
                        let id = dialog.id;
                        live.insert(id, dialog);
                        filling = Some(id);
                        id
                    }
                };
                let Some(dialog) = live.get_mut(&id) else {
                    filling = None;
                    continue;
                };
                messages.push(Message::new(&self.plan, dialog, dialog.queued));
                dialog.queued += 1;
                if dialog.queued == dialog.messages {
                    filling = None;
                }
            }
            let Some(started) = self.turn_after_read().await else {
                break;
            };
            let results = self.ingest(&messages, started).await;
            let mut staged = 0;
            for (message, result) in messages.iter().zip(&results) {
                let Some(dialog) = live.get_mut(&message.dialog) else {
                    continue;
                };
                dialog.sent += 1;
                if let Some(Staged { seq: Some(seq), .. }) = result {
                    dialog.acked.insert(*seq, message.id.clone());
                    staged += 1;
                }
            }
            let duplicates = results
                .iter()
                .flatten()
                .filter(|r| r.seq.is_some() && r.duplicate)
                .count() as u64;
            let endpoint = if self.plan.args.batch == 1 {
                Endpoint::Ingest
            } else {
                Endpoint::Batch
            };
            if let Some(stats) = self.record.endpoints.get_mut(&endpoint) {
                stats.messages += staged;
                stats.duplicates += duplicates;
            }
            self.plan.staged.fetch_add(staged, Ordering::Relaxed);
            // The dialogs whose last message (before or after the decision) this was.
            for message in &messages {
                let Some(dialog) = live.remove(&message.dialog) else {
                    continue;
                };
                if message.step + 1 < dialog.messages {
                    // More of its messages follow.
                    live.insert(dialog.id, dialog);
                    continue;
                }
                if message.step + 1 > dialog.messages || dialog.fate == Fate::Undecided {
                    // The message after its grant, or the last of an undecided dialog.
                    self.record.dialogs.insert(dialog.id, dialog.outcome());
                    continue;
                }
                let Some(started) = self.turn_after_read().await else {
                    live.insert(dialog.id, dialog);
                    break 'run;
                };
                let mut dialog = dialog;
                if !self.decide(&dialog, started).await {
                    // The decision is unknown: leave the dialog out of the check.
                    continue;
                }
                dialog.decided = true;
                if dialog.fate == Fate::Granted
                    && let Some(&last) = dialog.acked.keys().next_back()
                    && self.rng.chance(self.plan.args.probe)
                {
                    self.probes.spawn(probe(
                        self.plan.clone(),
                        self.client.clone(),
                        dialog.customer,
                        dialog.id,
                        last,
                        Instant::now(),
                    ));
                }
                if dialog.after_grant {
                    after_grant.push_back(dialog.id);
                    live.insert(dialog.id, dialog);
                } else {
                    self.record.dialogs.insert(dialog.id, dialog.outcome());
                }
            }
        }
        // The deadline: what was sent of the dialogs in play is checked too.
        for dialog in live.into_values() {
            if dialog.sent > 0 {
                self.record.dialogs.insert(dialog.id, dialog.outcome());
            }
        }
        while self.probes.join_next().await.is_some() {}
        self.record
    }
}

async fn worker(plan: Arc<Plan>, client: Arc<Client>, index: usize) -> Record {
    let interval =
        (plan.args.rate > 0).then(|| Duration::from_secs_f64(plan.args.concurrency as f64 / plan.args.rate as f64));
    Worker {
        rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)),
        plan,
        client,
        record: Record::new(),
        probes: tokio::task::JoinSet::new(),
        interval,
        next_send: Instant::now(),
    }
    .run()
    .await
}

/// A message read back: where it is stored, and its `messageId`.
struct Stored {
    dialog: i64,
    seq: i64,
    message_id: Option<String>,
}

/// Every message readable for `customer`, by cursor scan; `None` if a step failed.
async fn readable(client: &Client, customer: i64) -> Option<Vec<Stored>> {
    let mut found = Vec::new();
    let mut next = Some(format!("/data/?customerId={customer}&pageSize=1000&cursor="));
    while let Some(url) = next {
        let (status, page) = client
            .call(&url, None, PATIENT, client.retries.max(3), &mut Tally::default())
            .await?;
        if status != 200 {
            return None;
        }
        for m in page["results"].as_array()? {
            found.push(Stored {
                dialog: m["dialogId"].as_i64()?,
                seq: m["seq"].as_i64()?,
                message_id: m["messageId"].as_str().map(str::to_owned),
            });
        }
        next = page["next"].as_str().map(str::to_owned);
    }
    Some(found)
}

#[derive(Debug, Default, serde::Serialize)]
struct Check {
    granted_dialogs: usize,
    refused_dialogs: usize,
    undecided_dialogs: usize,
    acknowledged_granted_messages: usize,
    lost: usize,
    /// (dialog, seq) readable more than once, plus messages stored more than once (the
    /// same `messageId` under several seqs — a resend that was staged again).
    duplicated: usize,
    /// The second part of `duplicated`.
    message_id_stored_twice: usize,
    leaked: usize,
    unacknowledged_but_stored: usize,
    /// Acknowledged seqs readable under another `messageId` than the one sent for them.
    wrong_message_id: usize,
}

async fn check(client: &Client, record: &Record, settle: Duration) -> Option<Check> {
    let mut customers: BTreeSet<i64> = BTreeSet::new();
    let mut expected = 0;
    for outcome in record.dialogs.values() {
        customers.insert(outcome.customer);
        if outcome.fate == Fate::Granted {
            expected += outcome.acked.len();
        }
    }
    let deadline = Instant::now() + settle;
    loop {
        // (dialog, seq) → how often readable, and the messageId read last.
        let mut seen: HashMap<(i64, i64), (usize, Option<String>)> = HashMap::new();
        let mut by_dialog: HashMap<i64, BTreeSet<i64>> = HashMap::new();
        let mut places: HashMap<String, BTreeSet<(i64, i64)>> = HashMap::new();
        for &customer in &customers {
            for m in readable(client, customer).await? {
                by_dialog.entry(m.dialog).or_default().insert(m.seq);
                if let Some(id) = &m.message_id {
                    places.entry(id.clone()).or_default().insert((m.dialog, m.seq));
                }
                let entry = seen.entry((m.dialog, m.seq)).or_default();
                entry.0 += 1;
                entry.1 = m.message_id;
            }
        }
        let mut result = Check::default();
        let mut readable_granted = 0;
        let none = BTreeSet::new();
        for (dialog, outcome) in &record.dialogs {
            let stored = by_dialog.get(dialog).unwrap_or(&none);
            match outcome.fate {
                Fate::Granted => {
                    result.granted_dialogs += 1;
                    result.acknowledged_granted_messages += outcome.acked.len();
                    for (seq, id) in &outcome.acked {
                        match seen.get(&(*dialog, *seq)) {
                            Some((_, read)) => {
                                readable_granted += 1;
                                if read.as_deref() != Some(id.as_str()) {
                                    result.wrong_message_id += 1;
                                }
                            }
                            None => result.lost += 1,
                        }
                    }
                    result.unacknowledged_but_stored +=
                        stored.iter().filter(|s| !outcome.acked.contains_key(*s)).count();
                }
                Fate::Refused => {
                    result.refused_dialogs += 1;
                    result.leaked += stored.len();
                }
                Fate::Undecided => {
                    result.undecided_dialogs += 1;
                    result.leaked += stored.len();
                }
            }
        }
        result.message_id_stored_twice = places.values().map(|p| p.len() - 1).sum();
        result.duplicated = seen.values().filter(|(n, _)| *n > 1).count() + result.message_id_stored_twice;
        if readable_granted >= expected || Instant::now() >= deadline {
            return Some(result);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The human-readable summary: a table per endpoint, then totals, latency and check lines.
fn report(summary: &Value, check: Option<&Check>) -> String {
    use std::fmt::Write;
    let num = |v: &Value, key: &str| v[key].as_f64().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<23} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}  statuses",
        "endpoint", "requests", "req/s", "msgs/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "retries"
    );
    for e in summary["endpoints"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let messages = if num(e, "messages") > 0.0 {
            format!("{:.0}", num(e, "messages_per_second"))
        } else {
            "-".to_owned()
        };
        let items = if e["item_statuses"].is_object() {
            format!(", items {}", e["item_statuses"])
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<23} {:>9} {:>8.0} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>7}  {}{items}",
            e["endpoint"].as_str().unwrap_or_default(),
            e["requests"].as_u64().unwrap_or_default(),
            num(e, "per_second"),
            messages,
            num(e, "p50_ms"),
            num(e, "p90_ms"),
            num(e, "p99_ms"),
            num(e, "max_ms"),
            e["retries"].as_u64().unwrap_or_default(),
            e["statuses"]
        );
    }
    let causes = &summary["retry_causes"];
    let _ = writeln!(
        out,
        "messages staged: {} ({:.0}/s); retries: {} (timeouts {}, transport errors {}, 503s {}), answered as duplicates: {}; requests without an answer: {}",
        summary["messages"],
        num(summary, "messages_per_second"),
        summary["retries"],
        causes["timeout"],
        causes["transport"],
        causes["503"],
        summary["duplicate_answers"],
        summary["transport_errors"]
    );
    let visibility = &summary["grant_to_readable"];
    let _ = write!(
        out,
        "grant → readable: {} probes, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, not readable after 10 s: {}",
        visibility["probes"],
        num(visibility, "p50_ms"),
        num(visibility, "p90_ms"),
        num(visibility, "p99_ms"),
        num(visibility, "max_ms"),
        visibility["not_readable_after_10s"]
    );
    if let Some(c) = check {
        let _ = write!(
            out,
            "\ncheck: {} granted dialogs ({} acknowledged messages), {} refused, {} undecided — lost {}, duplicated {}, leaked {} (stored without a 202: {}, under another messageId: {})",
            c.granted_dialogs,
            c.acknowledged_granted_messages,
            c.refused_dialogs,
            c.undecided_dialogs,
            c.lost,
            c.duplicated,
            c.leaked,
            c.unacknowledged_but_stored,
            c.wrong_message_id
        );
    }
    out
}

fn percentile_ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let client = Arc::new(Client {
        http: match reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()
        {
            Ok(http) => http,
            Err(e) => {
                eprintln!("dapi-load: cannot build an HTTP client: {e}"); // allow: this tool reports on the terminal
                return ExitCode::from(2);
            }
        },
        url: args.url.trim_end_matches('/').to_owned(),
        ingest_token: args.ingest_token.clone(),
        read_token: args.read_token.clone(),
        timeout: args.timeout,
        retries: args.retries,
    });
    // IDs of this run: far from other runs' (seconds since the epoch, scaled); the
    // messageIds' run part from the nanoseconds.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = now.as_secs() as i64;
    let plan = Arc::new(Plan {
        customer_base: 1_000_000_000 + (epoch % 1_000_000) * 100_000,
        dialog_base: epoch * 10_000_000,
        run: format!("l{:x}", now.as_nanos() as u64),
        next_dialog: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        staged: AtomicU64::new(0),
        visibility: std::sync::Mutex::new(new_histogram()),
        invisible: AtomicU64::new(0),
        deadline: Instant::now() + args.duration,
        args,
    });

    let started = Instant::now();
    let workers: Vec<_> = (0..plan.args.concurrency)
        .map(|i| tokio::spawn(worker(plan.clone(), client.clone(), i)))
        .collect();
    let progress = {
        let plan = plan.clone();
        tokio::spawn(async move {
            let (mut last_sent, mut last_staged) = (0, 0);
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                let sent = plan.sent.load(Ordering::Relaxed);
                let staged = plan.staged.load(Ordering::Relaxed);
                eprint!(
                    // allow: this tool reports on the terminal
                    "\r{:>5.0}s  {sent:>9} requests  {:>7} req/s  {:>7} msgs/s ",
                    started.elapsed().as_secs_f64(),
                    sent - last_sent,
                    staged - last_staged
                );
                (last_sent, last_staged) = (sent, staged);
            }
        })
    };
    let mut record = Record::new();
    for worker in workers {
        if let Ok(r) = worker.await {
            record.merge(r);
        }
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(); // allow: this tool reports on the terminal

    let check = if plan.args.no_check {
        None
    } else {
        eprintln!("checking: reading back every message of this run's customers …"); // allow: this tool reports on the terminal
        match check(&client, &record, plan.args.settle).await {
            Some(check) => Some(check),
            None => {
                eprintln!("dapi-load: the loss check could not read the messages back"); // allow: this tool reports on the terminal
                return ExitCode::FAILURE;
            }
        }
    };

    let mut endpoints = Vec::new();
    let mut names: Vec<&Endpoint> = record.endpoints.keys().collect();
    names.sort();
    let (mut messages, mut duplicates, mut errors, mut retries) = (0, 0, 0, Tally::default());
    for endpoint in names {
        let stats = &record.endpoints[endpoint];
        let h = &stats.latency;
        let counts = |statuses: &BTreeMap<u16, u64>| {
            statuses
                .iter()
                .map(|(s, n)| (s.to_string(), json!(n)))
                .collect::<serde_json::Map<_, _>>()
        };
        let mut row = json!({
            "endpoint": endpoint.name(),
            "requests": h.len(),
            "per_second": h.len() as f64 / elapsed,
            "messages": stats.messages,
            "messages_per_second": stats.messages as f64 / elapsed,
            "retries": stats.retries.total(),
            "p50_ms": percentile_ms(h, 0.50),
            "p90_ms": percentile_ms(h, 0.90),
            "p99_ms": percentile_ms(h, 0.99),
            "max_ms": h.max() as f64 / 1000.0,
            "statuses": counts(&stats.statuses),
        });
        if *endpoint == Endpoint::Batch {
            row["item_statuses"] = json!(counts(&stats.item_statuses));
        }
        endpoints.push(row);
        messages += stats.messages;
        duplicates += stats.duplicates;
        errors += stats.errors;
        retries.add(&stats.retries);
    }
    let visibility = plan
        .visibility
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| unreachable_histogram());
    let grant_to_readable = json!({
        "probes": visibility.len(),
        "p50_ms": percentile_ms(&visibility, 0.50),
        "p90_ms": percentile_ms(&visibility, 0.90),
        "p99_ms": percentile_ms(&visibility, 0.99),
        "max_ms": visibility.max() as f64 / 1000.0,
        "not_readable_after_10s": plan.invisible.load(Ordering::Relaxed),
    });
    let summary = json!({
        "url": plan.args.url,
        "run": plan.run,
        "grant_to_readable": grant_to_readable,
        "seconds": elapsed,
        "concurrency": plan.args.concurrency,
        "rate": plan.args.rate,
        "batch": plan.args.batch,
        "timeout_ms": plan.args.timeout.as_millis() as u64,
        "max_retries": plan.args.retries,
        "messages": messages,
        "messages_per_second": messages as f64 / elapsed,
        "retries": retries.total(),
        "retry_causes": retries,
        "duplicate_answers": duplicates,
        "transport_errors": errors,
        "endpoints": endpoints,
        "check": check,
    });
    if plan.args.json {
        println!("{summary:#}"); // allow: this tool reports on the terminal
    } else {
        let text = report(&summary, check.as_ref());
        println!("{text}"); // allow: this tool reports on the terminal
    }
    match check {
        Some(c) if c.lost + c.duplicated + c.leaked + c.wrong_message_id > 0 => {
            eprintln!("dapi-load: FAILED: messages lost, duplicated, leaked or stored under another messageId"); // allow: this tool reports on the terminal
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}
