//! Observing every request: one span carrying its request id, and the request metrics
//! (count by route, method and status; latency histogram). No header, query value or
//! body goes into the span: tokens and customer text stay out of the logs.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::telemetry::{HTTP_DURATION, HTTP_REQUESTS};

/// Middleware: one span per request, carrying its request id, which is taken from
/// `x-request-id` when the client sent a sensible one (≤ 64 of `A-Z a-z 0-9 - _ .`),
/// else made up, and returned in the answer's `x-request-id`; and the request metrics.
/// No header, query value or body goes into the span: tokens and customer text stay out
/// of the logs.
pub async fn observe(mut request: Request, next: Next) -> Response {
    const HEADER: &str = "x-request-id";
    let given = request
        .headers()
        .get(HEADER)
        .filter(|v| {
            v.len() <= 64
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        })
        .filter(|v| !v.is_empty())
        .cloned();
    let id = given.unwrap_or_else(|| HeaderValue::from_str(&new_request_id()).unwrap_or(HeaderValue::from_static("-")));
    request.headers_mut().insert(HEADER, id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or("-"),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = method_label(request.method());
    let mut response = async move {
        let response = next.run(request).await;
        measure(route.as_ref(), method, response.status(), started);
        tracing::debug!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "answered"
        );
        response
    }
    .instrument(span)
    .await;
    response.headers_mut().insert(HEADER, id);
    response
}

/// A request id unique in this process and, by its prefix, across processes.
fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
    });
    format!("{prefix}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The `method` label: one of the methods HTTP defines, or `other`. Never the request's
/// own text: a client sending made-up methods (a method is any token, of any length)
/// would otherwise grow `/metrics`, and this process's memory, without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Records one answer: counted by route template, method and status, and timed. Every
/// label comes from a closed set — the matched route's template (unmatched requests share
/// one label), [`method_label`], the status — so no request can make the metric grow.
fn measure(route: Option<&MatchedPath>, method: &'static str, status: StatusCode, started: Instant) {
    let route = route.map_or("unmatched", MatchedPath::as_str);
    let (duration, requests) = handles(route, method, status);
    duration.record(started.elapsed().as_secs_f64());
    requests.increment(1);
}

/// The metrics of one (route, method, status), looked up in the registry once per worker
/// thread: a lookup per request (its labels built as `String`s and hashed) was ~6 % of
/// a single POST's instructions. Few combinations exist (routes × methods × statuses).
fn handles(route: &str, method: &'static str, status: StatusCode) -> (metrics::Histogram, metrics::Counter) {
    use std::cell::RefCell;
    type Entry = (Box<str>, &'static str, StatusCode, metrics::Histogram, metrics::Counter);
    thread_local! {
        static HANDLES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
    }
    HANDLES.with_borrow_mut(|handles| {
        if let Some((.., duration, requests)) = handles
            .iter()
            .find(|(r, m, s, ..)| *s == status && *m == method && &**r == route)
        {
            return (duration.clone(), requests.clone());
        }
        let labels = |status: Option<StatusCode>| {
            let mut labels = vec![
                metrics::Label::new("route", route.to_owned()),
                metrics::Label::new("method", method),
            ];
            if let Some(status) = status {
                labels.push(metrics::Label::new("status", status.as_str().to_owned()));
            }
            labels
        };
        let duration = metrics::histogram!(HTTP_DURATION, labels(None));
        let requests = metrics::counter!(HTTP_REQUESTS, labels(Some(status)));
        handles.push((route.into(), method, status, duration.clone(), requests.clone()));
        (duration, requests)
    })
}
