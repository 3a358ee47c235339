//! Parsing and validation on the request path, without I/O: what every POST pays before
//! it reaches Redis, and what every cursor step pays before it reaches PostgreSQL.
//!
//! Run: `cargo bench --bench domain`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapi::domain::{Cursor, CustomerId, DialogId, parse_consent, parse_message};

fn message_bodies(c: &mut Criterion) {
    let mut group = c.benchmark_group("message_body");
    for (name, text_len) in [("short", 12), ("1KiB", 1024), ("32KiB", 32 * 1024)] {
        let body = serde_json::json!({"text": "a".repeat(text_len), "language": "pt-BR"}).to_string();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let value: serde_json::Value = serde_json::from_slice(black_box(body.as_bytes())).expect("valid JSON");
                parse_message(value, 32 * 1024).expect("valid message")
            });
        });
    }
    group.finish();
}

fn ids_consents_cursors(c: &mut Criterion) {
    c.bench_function("path_ids", |b| {
        b.iter(|| {
            (
                CustomerId::parse(black_box("9223372036854775807")).expect("valid"),
                DialogId::parse(black_box("123456789")).expect("valid"),
            )
        });
    });
    let consent = br#"{"approved": "True"}"#;
    c.bench_function("consent_body", |b| {
        b.iter(|| {
            let value: serde_json::Value = serde_json::from_slice(black_box(consent)).expect("valid JSON");
            parse_consent(&value).expect("valid consent")
        });
    });
    let cursor = Cursor {
        received_at_us: 1_795_000_000_123_456,
        dialog_id: 42,
        seq: 7,
    };
    let encoded = cursor.encode();
    c.bench_function("cursor_encode", |b| b.iter(|| black_box(&cursor).encode()));
    c.bench_function("cursor_parse", |b| {
        b.iter(|| Cursor::parse(black_box(&encoded)).expect("valid"))
    });
}

criterion_group!(benches, message_bodies, ids_consents_cursors);
criterion_main!(benches);
