//! `dapi-load`: realistic traffic against any dapi, with a loss check at the end.
//!
//! Workers play chatbots: each runs one dialog at a time — a few messages, then a grant,
//! a refusal, or no decision at all, and after a grant maybe a message more — for a
//! handful of customers of which a few are hot; a share of requests are analysts
//! reading. Every 202 is recorded. At the end the run reads back, through the API, every
//! message of its own customers (IDs of this run only) and checks: every acknowledged
//! message of a granted dialog readable exactly once; nothing of a refused or undecided
//! dialog readable. Any loss, duplicate or leak makes it exit 1.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
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
    /// Requests per second in all; 0 sends as fast as the workers can.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Concurrent workers (connections).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Endpoint {
    Ingest,
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

/// What one worker saw.
struct Record {
    latencies: HashMap<Endpoint, Histogram<u64>>,
    statuses: HashMap<(Endpoint, u16), u64>,
    errors: u64,
    /// dialog → (customer, acknowledged seqs, fate)
    dialogs: HashMap<i64, (i64, BTreeSet<i64>, Fate)>,
}

impl Record {
    fn new() -> Self {
        Self {
            latencies: HashMap::new(),
            statuses: HashMap::new(),
            errors: 0,
            dialogs: HashMap::new(),
        }
    }

    fn note(&mut self, endpoint: Endpoint, started: Instant, status: Option<u16>) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let histogram = self.latencies.entry(endpoint).or_insert_with(|| {
            Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable_histogram())
        });
        let _ = histogram.record(micros.clamp(1, 60_000_000));
        match status {
            Some(status) => *self.statuses.entry((endpoint, status)).or_default() += 1,
            None => self.errors += 1,
        }
    }

    fn merge(&mut self, other: Record) {
        for (endpoint, histogram) in other.latencies {
            match self.latencies.get_mut(&endpoint) {
                Some(mine) => {
                    let _ = mine.add(&histogram);
                }
                None => {
                    self.latencies.insert(endpoint, histogram);
                }
            }
        }
        for (key, n) in other.statuses {
            *self.statuses.entry(key).or_default() += n;
        }
        self.errors += other.errors;
        self.dialogs.extend(other.dialogs);
    }
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

struct Client {
    http: reqwest::Client,
    url: String,
    ingest_token: Option<String>,
    read_token: Option<String>,
}

impl Client {
    async fn post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        let mut request = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(token) = &self.ingest_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or_default()))
    }

    async fn get(&self, path_and_query: &str) -> Option<(u16, Value)> {
        let url = if path_and_query.starts_with("http") {
            path_and_query.to_owned()
        } else {
            format!("{}{path_and_query}", self.url)
        };
        let mut request = self.http.get(url);
        if let Some(token) = &self.read_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or_default()))
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
    next_dialog: AtomicU64,
    sent: AtomicU64,
    deadline: Instant,
}

/// Polls until `seq` of `dialog` is readable; records the time since `granted`.
async fn probe(plan: Arc<Plan>, client: Arc<Client>, customer: i64, dialog: i64, seq: i64, granted: Instant) {
    while granted.elapsed() < Duration::from_secs(10) {
        if let Some((200, page)) = client.get(&format!("/data/?customerId={customer}&pageSize=1000")).await {
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

async fn worker(plan: Arc<Plan>, client: Arc<Client>, index: usize) -> Record {
    let args = &plan.args;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let mut record = Record::new();
    let mut probes = tokio::task::JoinSet::new();
    // Pace: each worker sends rate/concurrency requests per second.
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64));
    let mut next_send = Instant::now();
    let hot = (args.customers / 10).max(1);
    'dialogs: while Instant::now() < plan.deadline {
        let dialog = plan.dialog_base + plan.next_dialog.fetch_add(1, Ordering::Relaxed) as i64;
        let customer = plan.customer_base
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
        let mut acked = BTreeSet::new();
        let messages = 1 + rng.below(2 * args.messages.max(1));
        let after_grant = if fate == Fate::Granted { rng.below(2) } else { 0 };
        let steps = messages + u64::from(fate != Fate::Undecided) + after_grant;
        for step in 0..steps {
            if let Some(interval) = interval {
                next_send += interval;
                tokio::time::sleep_until(next_send.into()).await;
            }
            if Instant::now() >= plan.deadline {
                break 'dialogs;
            }
            if rng.chance(args.read) {
                read_once(&plan, &client, &mut rng, &mut record).await;
            }
            let started = Instant::now();
            plan.sent.fetch_add(1, Ordering::Relaxed);
            if step == messages && fate != Fate::Undecided {
                let approved = fate == Fate::Granted;
                let answer = client
                    .post(&format!("/consents/{dialog}"), &json!({ "approved": approved }))
                    .await;
                let endpoint = if approved { Endpoint::Grant } else { Endpoint::Refuse };
                record.note(endpoint, started, answer.as_ref().map(|a| a.0));
                if !answer.as_ref().is_some_and(|(s, _)| *s == 200 || *s == 202) {
                    // The decision is unknown: leave the dialog out of the check.
                    continue 'dialogs;
                }
                if approved
                    && let Some(&last) = acked.last()
                    && rng.chance(args.probe)
                {
                    probes.spawn(probe(
                        plan.clone(),
                        client.clone(),
                        customer,
                        dialog,
                        last,
                        Instant::now(),
                    ));
                }
            } else {
                let body = json!({"text": format!("load message {step} of dialog {dialog}"), "language": if step % 3 == 0 { "EN" } else { "de" }});
                let answer = client.post(&format!("/data/{customer}/{dialog}"), &body).await;
                record.note(Endpoint::Ingest, started, answer.as_ref().map(|a| a.0));
                if let Some((202, reply)) = answer
                    && let Some(seq) = reply["seq"].as_i64()
                {
                    acked.insert(seq);
                }
            }
        }
        record.dialogs.insert(dialog, (customer, acked, fate));
    }
    while probes.join_next().await.is_some() {}
    record
}

async fn read_once(plan: &Plan, client: &Client, rng: &mut Rng, record: &mut Record) {
    let customer = plan.customer_base + rng.below(plan.args.customers) as i64;
    let query = match rng.below(4) {
        0 => "/data/?pageSize=100".to_owned(),
        1 => "/data/?language=en&pageSize=100".to_owned(),
        2 => format!("/data/?customerId={customer}"),
        _ => format!("/data/?cursor=&customerId={customer}&language=de"),
    };
    plan.sent.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let answer = client.get(&query).await;
    record.note(Endpoint::Read, started, answer.map(|a| a.0));
}

/// Every (dialog, seq) readable for `customer`, by cursor scan; `None` if a step failed.
async fn readable(client: &Client, customer: i64) -> Option<Vec<(i64, i64)>> {
    let mut found = Vec::new();
    let mut next = Some(format!("/data/?customerId={customer}&pageSize=1000&cursor="));
    while let Some(url) = next {
        let (status, page) = client.get(&url).await?;
        if status != 200 {
            return None;
        }
        for m in page["results"].as_array()? {
            found.push((m["dialogId"].as_i64()?, m["seq"].as_i64()?));
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
    duplicated: usize,
    leaked: usize,
    unacknowledged_but_stored: usize,
}

async fn check(client: &Client, record: &Record, settle: Duration) -> Option<Check> {
    let mut customers: BTreeSet<i64> = BTreeSet::new();
    let mut expected = 0;
    for (customer, acked, fate) in record.dialogs.values() {
        customers.insert(*customer);
        if *fate == Fate::Granted {
            expected += acked.len();
        }
    }
    let deadline = Instant::now() + settle;
    loop {
        let mut seen: HashMap<(i64, i64), usize> = HashMap::new();
        for &customer in &customers {
            for key in readable(client, customer).await? {
                *seen.entry(key).or_default() += 1;
            }
        }
        let mut result = Check::default();
        let mut readable_granted = 0;
        for (dialog, (_, acked, fate)) in &record.dialogs {
            let stored: BTreeSet<i64> = seen.keys().filter(|(d, _)| d == dialog).map(|(_, s)| *s).collect();
            match fate {
                Fate::Granted => {
                    result.granted_dialogs += 1;
                    result.acknowledged_granted_messages += acked.len();
                    result.lost += acked.difference(&stored).count();
                    result.unacknowledged_but_stored += stored.difference(acked).count();
                    readable_granted += acked.intersection(&stored).count();
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
        result.duplicated = seen.values().filter(|n| **n > 1).count();
        if readable_granted >= expected || Instant::now() >= deadline {
            return Some(result);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The human-readable summary: a table per endpoint, then latency and check lines.
fn report(endpoints: &[Value], transport_errors: u64, visibility: &Value, check: Option<&Check>) -> String {
    use std::fmt::Write;
    let ms = |v: &Value, key: &str| v[key].as_f64().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<23} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}  statuses",
        "endpoint", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for e in endpoints {
        let _ = writeln!(
            out,
            "{:<23} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1}  {}",
            e["endpoint"].as_str().unwrap_or_default(),
            e["requests"],
            ms(e, "per_second"),
            ms(e, "p50_ms"),
            ms(e, "p90_ms"),
            ms(e, "p99_ms"),
            ms(e, "max_ms"),
            e["statuses"]
        );
    }
    let _ = writeln!(out, "transport errors: {transport_errors}");
    let _ = write!(
        out,
        "grant → readable: {} probes, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, not readable after 10 s: {}",
        visibility["probes"],
        ms(visibility, "p50_ms"),
        ms(visibility, "p90_ms"),
        ms(visibility, "p99_ms"),
        ms(visibility, "max_ms"),
        visibility["not_readable_after_10s"]
    );
    if let Some(c) = check {
        let _ = write!(
            out,
            "\ncheck: {} granted dialogs ({} acknowledged messages), {} refused, {} undecided — lost {}, duplicated {}, leaked {} (stored without a 202: {})",
            c.granted_dialogs,
            c.acknowledged_granted_messages,
            c.refused_dialogs,
            c.undecided_dialogs,
            c.lost,
            c.duplicated,
            c.leaked,
            c.unacknowledged_but_stored
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
            .timeout(Duration::from_secs(30))
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
    });
    // IDs of this run: far from other runs' (seconds since the epoch, scaled).
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let plan = Arc::new(Plan {
        customer_base: 1_000_000_000 + (epoch % 1_000_000) * 100_000,
        dialog_base: epoch * 10_000_000,
        next_dialog: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        visibility: std::sync::Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable_histogram()),
        ),
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
            let mut last = 0;
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                let sent = plan.sent.load(Ordering::Relaxed);
                eprint!(
                    // allow: this tool reports on the terminal
                    "\r{:>5.0}s  {sent:>9} requests  {:>7} req/s ",
                    started.elapsed().as_secs_f64(),
                    sent - last
                );
                last = sent;
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
    let mut names: Vec<&Endpoint> = record.latencies.keys().collect();
    names.sort();
    for endpoint in names {
        let h = &record.latencies[endpoint];
        let mut statuses: Vec<(u16, u64)> = record
            .statuses
            .iter()
            .filter(|((e, _), _)| e == endpoint)
            .map(|((_, s), n)| (*s, *n))
            .collect();
        statuses.sort();
        endpoints.push(json!({
            "endpoint": endpoint.name(),
            "requests": h.len(),
            "per_second": h.len() as f64 / elapsed,
            "p50_ms": percentile_ms(h, 0.50),
            "p90_ms": percentile_ms(h, 0.90),
            "p99_ms": percentile_ms(h, 0.99),
            "max_ms": h.max() as f64 / 1000.0,
            "statuses": statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        }));
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
        "grant_to_readable": grant_to_readable,
        "seconds": elapsed,
        "concurrency": plan.args.concurrency,
        "rate": plan.args.rate,
        "transport_errors": record.errors,
        "endpoints": endpoints,
        "check": check,
    });
    if plan.args.json {
        println!("{summary:#}"); // allow: this tool reports on the terminal
    } else {
        let text = report(&endpoints, record.errors, &grant_to_readable, check.as_ref());
        println!("{text}"); // allow: this tool reports on the terminal
    }
    match check {
        Some(c) if c.lost + c.duplicated + c.leaked > 0 => {
            eprintln!("dapi-load: FAILED: messages lost, duplicated or leaked"); // allow: this tool reports on the terminal
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}
