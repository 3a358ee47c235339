//! POST /data end to end over real HTTP to an in-process server, from 64 concurrent
//! keep-alive clients, beside two ceilings measured in the same run:
//!
//! - `plain_handler`: a bare axum handler that parses the JSON body and answers 202
//!   with a small JSON body — no layers, no validation, no Redis (the plain
//!   handler of BENCHMARKS.md): the figure users compare with.
//! - `same_layers_no_redis`: dapi's own router, layers and limits with an ingest handler
//!   that parses and validates the body as dapi does and answers without Redis. For
//!   diagnosis: the gap between the two ceilings is what the layers cost.
//!
//! And `post_data_batch_100`: `POST /data` with 100 messages a request, throughput in
//! messages. Each run prints its p50 and p99.
//!
//! Run: `cargo bench --bench ingest` (needs PostgreSQL and Redis, see README).

#![allow(clippy::unwrap_used)] // a bench that cannot set up has nothing to measure

mod common;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapi::http::AppState;
use serde_json::{Value, json};

const CONNECTIONS: usize = 64;
const BATCH: u64 = 100;

/// The plain handler: what axum alone answers at.
async fn plain(Path((customer, dialog)): Path<(i64, i64)>, Json(_body): Json<Value>) -> (StatusCode, Json<Value>) {
    (
        StatusCode::ACCEPTED,
        Json(json!({"customerId": customer, "dialogId": dialog, "seq": 1, "consent": "pending"})),
    )
}

/// The same-layers ceiling's handler: dapi's parsing and validation, then 202.
#[utoipa::path(post, path = "/data/{customerId}/{dialogId}")]
async fn validate_only(
    State(state): State<AppState>,
    Path((customer, dialog)): Path<(i64, i64)>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let body: Value = serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
    dapi::domain::parse_message(body, state.settings.max_text_bytes).map_err(|_| StatusCode::UNPROCESSABLE_ENTITY)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"customerId": customer, "dialogId": dialog, "seq": 1, "consent": "pending"})),
    ))
}

const MESSAGE: &[u8] = br#"{"text": "Hello, World", "language": "EN"}"#;

/// Dialogs of 5 messages over 100 customers, as a fleet of bots posts.
fn single(i: u64) -> (String, Vec<u8>) {
    (
        format!("/data/{}/{}", (i / 5) % 100, 1_000_000 + i / 5),
        MESSAGE.to_vec(),
    )
}

/// Batch `i`: 100 messages, 5 for each of 20 dialogs, fresh dialogs in every batch.
fn batch(i: u64) -> (String, Vec<u8>) {
    let messages: Vec<Value> = (0..BATCH)
        .map(|k| {
            let n = i * BATCH + k;
            json!({"customerId": (n / 5) % 100, "dialogId": 50_000_000 + n / 5,
                   "text": "Hello, World", "language": "EN"})
        })
        .collect();
    (
        "/data".to_owned(),
        serde_json::to_vec(&json!({ "messages": messages })).unwrap(),
    )
}

fn ingest(c: &mut Criterion) {
    let rt = common::runtime();
    let sandbox = rt.block_on(common::Sandbox::new("ingest"));
    let (plain_base, layers_base, api) = rt.block_on(async {
        let plain = sandbox
            .serve(axum::Router::new().route("/data/{customer}/{dialog}", axum::routing::post(plain)))
            .await;
        let layers = sandbox
            .serve(dapi::http::router_with_ingest(
                sandbox.state(),
                utoipa_axum::routes!(validate_only),
            ))
            .await;
        (plain, layers, sandbox.serve_api().await)
    });

    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(1)).sample_size(10);
    for (name, base) in [
        ("plain_handler", plain_base),
        ("same_layers_no_redis", layers_base),
        ("post_data", api.clone()),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter_custom(|iters| common::post_load(base.clone(), CONNECTIONS, iters, 202, single));
        });
    }
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("post_data_batch_100", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| common::post_load(api.clone(), CONNECTIONS, iters, 200, batch));
    });
    group.finish();
    drop(sandbox);
}

criterion_group!(benches, ingest);
criterion_main!(benches);
