//! Messages per second moved from Redis into PostgreSQL by the flusher — stage N dialogs,
//! grant them, time until every message is in PostgreSQL — beside the ceiling: a bulk
//! insert of the same rows (`INSERT … SELECT FROM UNNEST`, 1000 rows a transaction)
//! straight into the same schema. Both on an empty table and on one already holding
//! a million rows (`DAPI_BENCH_PRELOAD` for more).
//!
//! Run: `cargo bench --bench flush` (needs PostgreSQL and Redis, see README).

#![allow(clippy::unwrap_used)] // a bench that cannot set up has nothing to measure

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapi::domain::{CustomerId, DialogId, IncomingMessage, Language, MessageText};
use dapi::flusher::{Flusher, Outcome};
use dapi::staging::{Choice, Create, FlushQueue, NewMessage};

const DIALOGS: u64 = 2000;
const MESSAGES: u64 = 5;
const FLUSHERS: usize = 2;

/// Stages and grants `DIALOGS` dialogs starting at `first`, concurrently.
async fn stage_and_grant(sandbox: &common::Sandbox, first: u64) {
    let message = IncomingMessage {
        text: MessageText::parse("Hello, World — a typical chatbot input of some length".into(), 1024).unwrap(),
        language: Language::parse("EN".into()).unwrap(),
        message_id: None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..32 {
        let (staging, message) = (sandbox.staging.clone(), message.clone());
        tasks.spawn(async move {
            let mut d = first + lane;
            while d < first + DIALOGS {
                let dialog = DialogId::from_stored(d as i64);
                // One script call for the dialog's messages, as a batch POST stages them.
                let batch = vec![
                    NewMessage {
                        customer: CustomerId::from_stored((d % 100) as i64),
                        dialog,
                        message: &message,
                        create: Create::New,
                    };
                    MESSAGES as usize
                ];
                staging.stage(&batch).await.unwrap();
                staging.decide(dialog, Choice::Grant, None, None).await.unwrap();
                d += 32;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs flushers until `target` messages are inserted; returns the time it took.
async fn drain(sandbox: &common::Sandbox, target: u64) -> Duration {
    let inserted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..FLUSHERS {
        let connector = dapi::staging::Connector::new(&sandbox.settings.redis_url, false).unwrap();
        let queue = FlushQueue::new(
            &connector,
            sandbox.keys(),
            format!("bench-{index}"),
            Duration::from_secs(60),
            Duration::from_millis(20),
            sandbox.settings.staging_ttl,
        )
        .unwrap();
        let mut flusher = Flusher::new(queue, sandbox.store.clone(), 256);
        let inserted = inserted.clone();
        tasks.spawn(async move {
            while inserted.load(Ordering::SeqCst) < target {
                if let Outcome::Flushed { applied, .. } = flusher.flush_once().await.unwrap() {
                    inserted.fetch_add(applied.inserted, Ordering::SeqCst);
                }
            }
        });
    }
    while inserted.load(Ordering::SeqCst) < target {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = started.elapsed();
    while tasks.join_next().await.is_some() {}
    elapsed
}

/// The ceiling: the same number of rows, bulk-inserted 1000 a transaction.
async fn bulk_insert(sandbox: &common::Sandbox, first: u64) -> Duration {
    let rows = DIALOGS * MESSAGES;
    let started = Instant::now();
    let mut n = 0;
    while n < rows {
        let batch: Vec<u64> = (n..(n + 1000).min(rows)).collect();
        let dialogs: Vec<i64> = batch.iter().map(|i| (first + i / MESSAGES) as i64).collect();
        let seqs: Vec<i64> = batch.iter().map(|i| (1 + i % MESSAGES) as i64).collect();
        let customers: Vec<i64> = dialogs.iter().map(|d| d % 100).collect();
        let languages = vec!["EN"; batch.len()];
        let texts = vec!["Hello, World — a typical chatbot input of some length"; batch.len()];
        let now = time::OffsetDateTime::now_utc();
        let times = vec![now; batch.len()];
        let mut tx = sandbox.store.pool().begin().await.unwrap();
        sqlx::query(
            "INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at)
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::timestamptz[])
             ON CONFLICT (dialog_id, seq, received_at) DO NOTHING",
        )
        .bind(dialogs)
        .bind(seqs)
        .bind(customers)
        .bind(languages)
        .bind(texts)
        .bind(times)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        n += 1000;
    }
    started.elapsed()
}

async fn preload(sandbox: &common::Sandbox, rows: i64) {
    sqlx::query(
        "INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at)
         SELECT 1000000000000 + g / 5, 1 + g % 5, g % 1000, (ARRAY['EN','de','fr','pt-BR'])[1 + g % 4],
                'preloaded message ' || g, now() - make_interval(secs => g)
         FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(rows)
    .execute(sandbox.store.pool())
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE messages")
        .execute(sandbox.store.pool())
        .await
        .unwrap();
}

fn flush(c: &mut Criterion) {
    let rt = common::runtime();
    // DAPI_BENCH_PRELOAD sets the big table's size (default 1M; BENCHMARKS.md also
    // reports a manual run at 5M).
    let big: i64 = std::env::var("DAPI_BENCH_PRELOAD")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    for (label, preloaded) in [("empty_table".to_owned(), 0), (format!("table_of_{big}"), big)] {
        let sandbox = rt.block_on(common::Sandbox::new(&format!("flush{preloaded}")));
        if preloaded > 0 {
            rt.block_on(preload(&sandbox, preloaded));
        }
        let next = AtomicU64::new(1);
        let mut group = c.benchmark_group(format!("flush/{label}"));
        group
            .throughput(Throughput::Elements(DIALOGS * MESSAGES))
            .sample_size(10);
        group.bench_function("bulk_insert_ceiling", |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (sandbox, next) = (&sandbox, &next);
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += bulk_insert(sandbox, next.fetch_add(DIALOGS, Ordering::Relaxed)).await;
                    }
                    total
                }
            });
        });
        group.bench_function("flusher", |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (sandbox, next) = (&sandbox, &next);
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        stage_and_grant(sandbox, next.fetch_add(DIALOGS, Ordering::Relaxed)).await;
                        total += drain(sandbox, DIALOGS * MESSAGES).await;
                    }
                    total
                }
            });
        });
        group.finish();
        drop(sandbox);
    }
}

criterion_group!(benches, flush);
criterion_main!(benches);
