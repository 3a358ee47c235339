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
//!
//! With `--export` an analyst's job syncs with `GET /data/export` resume tokens while the
//! traffic runs, and the check requires the export to have delivered every acknowledged
//! message of a granted dialog exactly once and nothing of refused or undecided ones
//! (`export`).
//!
//! With `--erase-rate N` it also erases N customers a second while the traffic runs
//! (`DELETE /customers/{customerId}`, polling `GET /erasures/{erasureId}` after a 503
//! `erasure_pending`), picked among those it has had messages acknowledged for; the check
//! then counts as leaked any message acknowledged before its customer's erasure was sent
//! that is still readable, or whose dialog does not read as refused, and the report shows
//! the erasures' latency until completed.

#![forbid(unsafe_code)]

// The modules in reading order: `record` (what a run saw), `client` (HTTP and resends),
// `worker` (the traffic), `check` (the loss check), `report` (the table); `main` below
// ties them together.
mod check;
mod client;
mod erase;
mod export;
mod record;
mod report;
mod worker;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

use crate::check::{Check, check};
use crate::client::Client;
use crate::record::{Endpoint, Record, Tally, new_histogram, percentile_ms, unreachable_histogram};
use crate::report::report;
use crate::worker::{Plan, worker};

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
    /// Privacy token, for `--erase-rate` (and the check's `GET /consents`).
    #[arg(long, env = "DAPI_LOAD_PRIVACY_TOKEN")]
    privacy_token: Option<String>,
    /// Customers erased per second while the traffic runs (`DELETE /customers/{customerId}`
    /// with the privacy token; after a 503 `erasure_pending`, `GET /erasures/{erasureId}`
    /// until completed), each picked among those a message was acknowledged for. The
    /// check then requires every message acknowledged before its customer's erasure was
    /// sent to be unreadable and its dialog refused (else it counts as leaked); messages
    /// in flight while an erasure ran may go either way. The report adds the erasures'
    /// latency from the request until completed. 0: none.
    #[arg(long, default_value_t = 0)]
    erase_rate: u64,
    /// Run an analyst's job beside the traffic: it syncs with `GET /data/export` resume
    /// tokens every `--export-every` (from what was received since just before the run);
    /// after the loss check it syncs until caught up, and the check then requires every
    /// acknowledged message of a granted dialog received exactly once (those an erasure
    /// took or may have taken: at most once) and nothing of refused or undecided dialogs.
    #[arg(long)]
    export: bool,
    /// Pause between the exporter's syncs.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    export_every: Duration,
    /// `limit` of each export request (a sync follows tokens until one sends fewer).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    export_limit: u64,
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
        privacy_token: args.privacy_token.clone(),
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
        posted: if args.erase_rate > 0 {
            (0..args.customers).map(|_| AtomicBool::new(false)).collect()
        } else {
            Vec::new()
        },
        erased: std::sync::Mutex::new(std::collections::HashSet::new()),
        args,
    });

    let started = Instant::now();
    let workers: Vec<_> = (0..plan.args.concurrency)
        .map(|i| tokio::spawn(worker(plan.clone(), client.clone(), i)))
        .collect();
    let eraser = (plan.args.erase_rate > 0).then(|| tokio::spawn(erase::eraser(plan.clone(), client.clone())));
    let exporter = plan.args.export.then(|| {
        let exported = export::Exported::new(std::time::SystemTime::now());
        tokio::spawn(export::exporter(plan.clone(), client.clone(), exported))
    });
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
    let elapsed = started.elapsed().as_secs_f64();
    let mut erasures = Vec::new();
    if let Some(eraser) = eraser
        && let Ok((done, r)) = eraser.await
    {
        erasures = done;
        record.merge(r);
    }
    let mut exported = None;
    if let Some(exporter) = exporter
        && let Ok((done, r)) = exporter.await
    {
        exported = Some(done);
        record.merge(r);
    }
    progress.abort();
    eprintln!(); // allow: this tool reports on the terminal
    let rejected = erasures.iter().filter(|e| e.state == erase::State::Rejected).count();
    if rejected > 0 {
        eprintln!("dapi-load: {rejected} erasures were refused (is --privacy-token set?)"); // allow: this tool reports on the terminal
    }

    let check = if plan.args.no_check {
        None
    } else {
        eprintln!("checking: reading back every message of this run's customers …"); // allow: this tool reports on the terminal
        match check(&client, &record, &erasures, plan.args.settle).await {
            Some(mut check) => {
                if let Some(exported) = &mut exported {
                    // Everything readable is readable now: the last syncs must bring it.
                    let mut syncs = Record::new();
                    if !exported.catch_up(&plan, &client, &mut syncs).await {
                        eprintln!("dapi-load: the exporter could not catch up"); // allow: this tool reports on the terminal
                        return ExitCode::FAILURE;
                    }
                    let rules = check::erasure_rules(&record, &erasures);
                    check.export = Some(exported.check(&record, &|d, s| rules.contains_key(&(d, s))));
                }
                Some(check)
            }
            None => {
                eprintln!("dapi-load: the loss check could not read the messages back"); // allow: this tool reports on the terminal
                return ExitCode::FAILURE;
            }
        }
    };

    let mut summary = summary(&plan, &record, check.as_ref(), elapsed);
    if plan.args.erase_rate > 0 {
        summary["erase_rate"] = json!(plan.args.erase_rate);
        summary["erasures"] = erase::summary(&erasures);
    }
    if plan.args.json {
        println!("{summary:#}"); // allow: this tool reports on the terminal
    } else {
        let text = report(&summary, check.as_ref());
        println!("{text}"); // allow: this tool reports on the terminal
    }
    match check {
        Some(c) if c.export.as_ref().is_some_and(|e| e.failures() > 0) => {
            eprintln!("dapi-load: FAILED: the export missed, repeated or leaked messages"); // allow: this tool reports on the terminal
            ExitCode::FAILURE
        }
        Some(c) if c.lost + c.duplicated + c.leaked + c.wrong_message_id > 0 => {
            eprintln!("dapi-load: FAILED: messages lost, duplicated, leaked or stored under another messageId"); // allow: this tool reports on the terminal
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

/// The summary of the run, as printed with `--json`; the table is drawn from it.
fn summary(plan: &Plan, record: &Record, check: Option<&Check>, elapsed: f64) -> Value {
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
    json!({
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
    })
}
