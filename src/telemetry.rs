//! Logging and metrics: the tracing subscriber, configured once at start, and the
//! Prometheus recorder that `GET /metrics` renders (with the names of the series dapi
//! records outside a request). Knows no domain type.
//!
//! The filter and format come from the settings (`DAPI_LOG`, else `RUST_LOG`, else
//! `info`; `DAPI_LOG_FORMAT=json` writes one JSON object per line). Customer text never
//! reaches a log line: the types that hold it print only their length.

use std::error::Error;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber with `filter`, which `config` has checked to parse.
/// Calling it twice keeps the first (tests do).
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in a file or a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// An error and all its causes on one line: `outer: middle: root`.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Metric names, in one place. Labels: `route` is the matched path template (never a
/// raw path with IDs), `store` is `redis` or `postgres`.
pub const HTTP_REQUESTS: &str = "dapi_http_requests_total";
pub const HTTP_DURATION: &str = "dapi_http_request_duration_seconds";
pub const STAGED_MESSAGES: &str = "dapi_staged_messages_total";
pub const STAGED_DIALOGS: &str = "dapi_staged_dialogs_total";
pub const INGEST_CALL_MESSAGES: &str = "dapi_ingest_call_messages";
pub const FLUSH_QUEUE_LENGTH: &str = "dapi_flush_queue_length";
pub const FLUSH_QUEUE_PENDING: &str = "dapi_flush_queue_pending";
pub const FLUSH_QUEUE_OLDEST_AGE: &str = "dapi_flush_queue_oldest_age_seconds";
pub const FLUSHED_MESSAGES: &str = "dapi_flushed_messages_total";
pub const FLUSH_BATCHES: &str = "dapi_flush_batches_total";
pub const FLUSH_BATCH_DURATION: &str = "dapi_flush_batch_duration_seconds";
pub const ERASURES: &str = "dapi_erasures_total";
pub const ERASED_MESSAGES: &str = "dapi_erased_messages_total";
pub const STORE_ERRORS: &str = "dapi_store_errors_total";
pub const FLUSH_QUARANTINED: &str = "dapi_flush_quarantined_total";
pub const REQUEST_QUARANTINED: &str = "dapi_request_quarantined_total";
pub const CUSTOMER_ERASURES: &str = "dapi_customer_erasures_total";
pub const CUSTOMER_ERASURE_DURATION: &str = "dapi_customer_erasure_duration_seconds";
pub const CUSTOMER_ERASURES_PENDING: &str = "dapi_customer_erasures_pending";
pub const PARTITIONS_DROPPED: &str = "dapi_partitions_dropped_total";
pub const REPLICA_LAG_BYTES: &str = "dapi_replica_lag_bytes";
pub const REPLICA_LAG_SECONDS: &str = "dapi_replica_lag_seconds";

/// Installs the Prometheus recorder once per process and returns its handle; later
/// calls (tests start many apps in one process) return the same handle.
pub fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let messages = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(INGEST_CALL_MESSAGES.into()), &messages))
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        tracing::warn!("another metrics recorder is installed; /metrics shows only dapi's own");
                    }
                    describe();
                    start_at_zero();
                    handle
                }
                // Only reachable with an empty bucket list, which the lists above are not.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Counters of rare events are shown at 0 from the start, not first when one happens: a
/// series that appears only with its first increment hides that first one from
/// `rate()`/`increase()` and from alerts on them.
fn start_at_zero() {
    for name in [
        STAGED_MESSAGES,
        STAGED_DIALOGS,
        FLUSHED_MESSAGES,
        FLUSH_QUARANTINED,
        REQUEST_QUARANTINED,
        FLUSH_BATCHES,
        ERASURES,
        ERASED_MESSAGES,
        PARTITIONS_DROPPED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for store in ["redis", "postgres"] {
        metrics::counter!(STORE_ERRORS, "store" => store).increment(0);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route, method and status");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency, by route and method"
    );
    describe_counter!(STAGED_MESSAGES, "messages accepted into Redis (202) by this process");
    describe_counter!(STAGED_DIALOGS, "dialogs started (first message staged) by this process");
    describe_histogram!(
        INGEST_CALL_MESSAGES,
        "messages per ingest script call: a batch's, or single POSTs staged together under load"
    );
    describe_gauge!(FLUSH_QUEUE_LENGTH, "entries in the flush queue");
    describe_gauge!(
        FLUSH_QUEUE_PENDING,
        "flush-queue entries delivered to a flusher and not yet acknowledged"
    );
    describe_gauge!(
        FLUSH_QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "age of the oldest flush-queue entry"
    );
    describe_counter!(FLUSHED_MESSAGES, "messages written to PostgreSQL by the flusher");
    describe_counter!(
        FLUSH_QUARANTINED,
        "dialogs the flusher could not read and set aside (README, \"Quarantine\")"
    );
    describe_counter!(
        REQUEST_QUARANTINED,
        "dialogs a request found holding Redis keys of a type dapi does not write there, and set aside (docs/operations.md, \"Quarantine\")"
    );
    describe_counter!(
        CUSTOMER_ERASURES,
        "customer erasures answered, by outcome: completed (200) or pending (503 erasure_pending)"
    );
    describe_histogram!(
        CUSTOMER_ERASURE_DURATION,
        Unit::Seconds,
        "time a DELETE /customers/{customerId} took to answer"
    );
    describe_gauge!(
        CUSTOMER_ERASURES_PENDING,
        "customer erasures pending, as the last pass of the loop that finishes them found"
    );
    describe_counter!(FLUSH_BATCHES, "flush batches committed");
    describe_histogram!(
        FLUSH_BATCH_DURATION,
        Unit::Seconds,
        "time to flush one batch, snapshot to acknowledgement"
    );
    describe_counter!(ERASURES, "refusals whose erasure reached PostgreSQL");
    describe_counter!(ERASED_MESSAGES, "messages deleted from PostgreSQL by refusals");
    describe_counter!(STORE_ERRORS, "failed calls to Redis or PostgreSQL, by store");
    describe_counter!(
        PARTITIONS_DROPPED,
        "monthly partitions of messages dropped past DAPI_RETENTION by this process"
    );
    describe_gauge!(
        REPLICA_LAG_BYTES,
        "WAL the read replica has still to replay (DATABASE_READ_URL only)"
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        Unit::Seconds,
        "time since the last transaction the read replica replayed, 0 when caught up (DATABASE_READ_URL only)"
    );
}
