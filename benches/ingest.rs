//! POST /data end to end over real HTTP to an in-process server, from many concurrent
//! keep-alive clients, beside the ceiling: the same router, body and validation with a
//! handler that answers 202 without touching Redis. BENCHMARKS.md reports the ratio.
//!
//! Run: `cargo bench --bench ingest` (needs PostgreSQL and Redis, see README).

#![allow(clippy::unwrap_used)] // a bench that cannot set up has nothing to measure

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CONNECTIONS: usize = 64;

fn ingest(c: &mut Criterion) {
    let rt = common::runtime();
    let sandbox = rt.block_on(common::Sandbox::new("ingest"));
    let (api, ceiling) = rt.block_on(async {
        let api = sandbox.serve_api().await;
        let ceiling = sandbox.serve(dapi::http::ceiling_router(sandbox.state())).await;
        (api, ceiling)
    });

    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(1)).sample_size(10);
    for (name, base) in [("ceiling_no_redis", ceiling), ("post_data", api)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let base = base.clone();
                // Dialogs of 5 messages over 100 customers, as a fleet of bots posts.
                common::post_load(base, CONNECTIONS, iters, |i| {
                    format!("/data/{}/{}", (i / 5) % 100, 1_000_000 + i / 5)
                })
            });
        });
    }
    group.finish();
    drop(sandbox);
}

criterion_group!(benches, ingest);
criterion_main!(benches);
