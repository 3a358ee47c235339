//! The ceilings for `scripts/bench/bench-ingest`: a bare axum server whose
//! `POST /data/{customerId}/{dialogId}` parses the JSON body and answers 202 with a
//! small JSON body — no layers, no validation — on the runtime dapi uses (tokio's
//! default multi-thread runtime, mimalloc).
//!
//! - Without a Redis URL: the plain handler (BENCHMARKS.md's "plain"), no
//!   Redis. What dapi's single POST is compared with.
//! - With one: the same plus one `RPUSH` on a multiplexed connection before answering
//!   (BENCHMARKS.md's "rpush"): what any handler that waits for one Redis
//!   round trip can reach on this machine. Pushes to `dapi-ceiling:<dialog % 1024>`;
//!   bench-ingest deletes those keys afterwards.
//!
//! Run: `cargo run --release --example ceiling -- 127.0.0.1:18081 [redis://127.0.0.1:6379]`

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn answer(
    State(redis): State<Option<ConnectionManager>>,
    Path((customer, dialog)): Path<(i64, i64)>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    if let Some(mut redis) = redis {
        let key = format!("dapi-ceiling:{}", dialog % 1024);
        let text = body["text"].as_str().unwrap_or_default();
        let _: i64 = redis::cmd("RPUSH")
            .arg(key)
            .arg(text)
            .query_async(&mut redis)
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"customerId": customer, "dialogId": dialog, "seq": 1, "consent": "pending"})),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18081".to_owned());
    let redis = match args.next() {
        Some(url) => Some(ConnectionManager::new(redis::Client::open(url)?).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = axum::Router::new()
        .route("/data/{customer}/{dialog}", axum::routing::post(answer))
        .with_state(redis);
    axum::serve(listener, app).await?;
    Ok(())
}
