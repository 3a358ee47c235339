//! GET /data over HTTP at a million consented rows: page 1 of every filter form (with its
//! exact count), a deep page, and a cursor step half a million rows deep.
//! For the manual run at 10 million rows: `DAPI_BENCH_ROWS=10000000 cargo bench --bench read`.
//!
//! Run: `cargo bench --bench read` (needs PostgreSQL and Redis, see README).

#![allow(clippy::unwrap_used)] // a bench that cannot set up has nothing to measure

mod common;

use criterion::{Criterion, criterion_group, criterion_main};

async fn preload(sandbox: &common::Sandbox, rows: i64) {
    let pool = sandbox.store.pool();
    sqlx::query(
        "INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at)
         SELECT g / 5, 1 + g % 5, (g / 5) % 10000, (ARRAY['EN','de','fr','pt-BR'])[1 + (g / 5) % 4],
                'message number ' || g, timestamptz '2026-01-01' + make_interval(secs => g / 10.0)
         FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(rows)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO message_counts (customer_id, language, part, n)
         SELECT coalesce(customer_id, -1), coalesce(lower(language), ''), messages_month(received_at), count(*)
         FROM messages
         GROUP BY messages_month(received_at),
                  GROUPING SETS ((customer_id, lower(language)), (customer_id), (lower(language)), ())",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE").execute(pool).await.unwrap();
}

fn read(c: &mut Criterion) {
    let rows: i64 = std::env::var("DAPI_BENCH_ROWS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let rt = common::runtime();
    let sandbox = rt.block_on(common::Sandbox::new("read"));
    rt.block_on(preload(&sandbox, rows));
    let base = rt.block_on(sandbox.serve_api());
    let http = reqwest::Client::new();
    // A cursor half way down: the position of the row at that depth.
    let deep_cursor: String = rt.block_on(async {
        let (at, dialog, seq): (time::OffsetDateTime, i64, i64) = sqlx::query_as(
            "SELECT received_at, dialog_id, seq FROM messages ORDER BY received_at DESC, dialog_id DESC, seq DESC OFFSET $1 LIMIT 1",
        )
        .bind(rows / 2)
        .fetch_one(sandbox.store.pool())
        .await
        .unwrap();
        dapi::domain::Cursor { received_at_us: dapi::store::micros_of(at), dialog_id: dialog, seq }.encode()
    });

    let mut group = c.benchmark_group(format!("read/{rows}_rows"));
    let cases = [
        ("page1_all", "/data/?pageSize=100".to_owned()),
        ("page1_language", "/data/?language=de&pageSize=100".to_owned()),
        ("page1_customer", "/data/?customerId=4242&pageSize=100".to_owned()),
        (
            "page1_customer_language",
            "/data/?customerId=4242&language=de&pageSize=100".to_owned(),
        ),
        ("page_5000_offset_500k", "/data/?page=5000&pageSize=100".to_owned()),
        (
            "cursor_step_half_way_down",
            format!("/data/?cursor={deep_cursor}&pageSize=100"),
        ),
    ];
    let mut tails = Vec::new();
    for (name, query) in cases {
        let url = format!("{base}{query}");
        // Criterion reports means; the targets are p99, so take 500 timed requests too.
        let mut micros: Vec<u128> = rt.block_on(async {
            let mut out = Vec::with_capacity(500);
            for _ in 0..500 {
                let started = std::time::Instant::now();
                let response = http.get(&url).send().await.unwrap();
                let _ = response.bytes().await.unwrap();
                out.push(started.elapsed().as_micros());
            }
            out
        });
        micros.sort_unstable();
        tails.push(format!(
            "{name}: p50 {:.2} ms, p99 {:.2} ms",
            micros[250] as f64 / 1000.0,
            micros[494] as f64 / 1000.0
        ));
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let response = http.get(&url).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 200, "{url}");
                response.bytes().await.unwrap()
            });
        });
    }
    group.finish();
    for line in tails {
        eprintln!("read/{rows}_rows {line}");
    }
    drop(sandbox);
}

criterion_group!(benches, read);
criterion_main!(benches);
