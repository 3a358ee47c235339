//! GET /data/export and GET /data's time ranges: order, limit and resume, messages that
//! became readable late, bounds and exact counts, bad input, compression, concurrent
//! flushes, refusals and erasures while an export runs.

use std::collections::BTreeSet;
use std::io::Read;

use reqwest::StatusCode;
use serde_json::Value;

use dapi::store::retention::month_start;

use crate::helpers::{TestApp, assert_fine_counts_exact, assert_problem, spawn_api_only, test_settings};
use crate::helpers::{drain, flusher, refusal_of, states_of};

const T: i64 = 1_795_000_000_000_000; // 2026-11-18T11:06:40Z

/// Stores granted dialogs through the store (the flusher's own write path, export
/// epochs included), with chosen timestamps: `(customer, dialog, seq, language, µs)`.
async fn store_granted(app: &TestApp, rows: &[(i64, i64, i64, &str, i64)]) {
    app.store.apply(&states_of(rows, "")).await.unwrap();
}

/// Microseconds since the epoch as RFC 3339.
fn iso(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// One export: its message lines and its resume token.
struct Export {
    messages: Vec<Value>,
    resume: String,
}

impl Export {
    fn ids(&self) -> Vec<(i64, i64)> {
        self.messages
            .iter()
            .map(|m| (m["dialogId"].as_i64().unwrap(), m["seq"].as_i64().unwrap()))
            .collect()
    }
}

/// The lines of an NDJSON body: every one a JSON object, the last one the resume line.
fn lines_of(body: &str) -> Export {
    assert!(body.ends_with('\n'), "no final newline: {body:?}");
    let mut lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let last = lines.pop().expect("a resume line");
    let resume = last["resume"]
        .as_str()
        .unwrap_or_else(|| panic!("not a resume line: {last}"))
        .to_owned();
    assert_eq!(last.as_object().unwrap().len(), 1, "{last}");
    for line in &lines {
        assert!(line.get("resume").is_none(), "a resume line before the end");
    }
    Export {
        messages: lines,
        resume,
    }
}

async fn export(app: &TestApp, query: &str) -> Export {
    let response = app.get(&format!("/data/export?{query}")).await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    lines_of(&response.text().await.unwrap())
}

/// Follows resume tokens from `token` (fresh when empty) until an export sends nothing.
async fn sync(app: &TestApp, filters: &str, token: &mut String, limit: usize) -> Vec<(i64, i64)> {
    let mut got = Vec::new();
    loop {
        let query = if token.is_empty() {
            format!("{filters}&limit={limit}")
        } else {
            format!("{filters}&limit={limit}&resume={token}")
        };
        let page = export(app, &query).await;
        *token = page.resume.clone();
        let n = page.messages.len();
        got.extend(page.ids());
        if n < limit {
            return got;
        }
    }
}

#[tokio::test]
async fn an_export_is_oldest_first_with_getdata_fields_and_a_resume_line() {
    let app = spawn_api_only(test_settings()).await;
    // An empty store: the resume line alone.
    let empty = export(&app, "").await;
    assert!(empty.messages.is_empty());
    store_granted(
        &app,
        &[
            (1, 3, 1, "EN", T + 9),
            (1, 1, 2, "EN", T + 5),
            (1, 2, 1, "de", T + 5),
            (1, 1, 1, "EN", T),
            (2, 2, 2, "de", T + 5),
        ],
    )
    .await;

    let all = export(&app, "").await;
    assert_eq!(all.ids(), [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]);
    // Each line is exactly what GET /data's `results` holds for the message.
    let page = app.get_json("/data/?pageSize=10").await;
    let mut newest_first = page["results"].as_array().unwrap().clone();
    newest_first.reverse();
    assert_eq!(all.messages, newest_first);
    // The empty store's token continues with everything stored since.
    assert_eq!(export(&app, &format!("resume={}", empty.resume)).await.ids(), all.ids());
    // Nothing new since the full export: its token sends nothing.
    assert!(
        export(&app, &format!("resume={}", all.resume))
            .await
            .messages
            .is_empty()
    );
}

#[tokio::test]
async fn limit_and_resume_send_everything_once_in_order() {
    let app = spawn_api_only(test_settings()).await;
    let rows: Vec<(i64, i64, i64, &str, i64)> = (0..25)
        .map(|i| ((i % 7) % 3, 100 + i % 7, 1 + i, "EN", T + i * 10))
        .collect();
    store_granted(&app, &rows).await;

    let all = export(&app, "").await.ids();
    assert_eq!(all.len(), 25);
    let mut token = String::new();
    let synced = sync(&app, "", &mut token, 4).await;
    assert_eq!(synced, all);
    let limited = export(&app, "limit=0").await;
    assert!(limited.messages.is_empty());
    assert_eq!(export(&app, &format!("resume={}", limited.resume)).await.ids(), all);

    // Filters: the token keeps them; repeating them is fine, changing them is not.
    let mut token = String::new();
    let customer = sync(&app, "customerId=1&language=en", &mut token, 3).await;
    let expected: Vec<(i64, i64)> = rows.iter().filter(|r| r.0 == 1).map(|r| (r.1, r.2)).collect();
    assert_eq!(customer, expected);
    let first = export(&app, "customerId=1&limit=2").await;
    let rest = export(&app, &format!("resume={}", first.resume)).await;
    let again = export(&app, &format!("customerId=1&resume={}", first.resume)).await;
    assert_eq!(rest.ids(), again.ids());
    assert_eq!([first.ids(), rest.ids()].concat(), expected);
    assert_problem(
        app.get(&format!("/data/export?customerId=2&resume={}", first.resume))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
}

/// A dialog received before the last message an export sent, consented after it: the
/// next sync delivers it, for a whole-store export and for its customer's.
#[tokio::test]
async fn a_late_consented_dialog_is_delivered_by_the_next_sync() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    // Monday: dialog 1 (customer 5) is received, undecided.
    app.stage(5, 1, "monday", "EN").await;
    // Tuesday: dialog 2 of the same customer, consented and flushed.
    app.stage(5, 2, "tuesday", "EN").await;
    app.consent(2, true).await;
    drain(&mut flusher).await;
    let whole = export(&app, "").await;
    let own = export(&app, "customerId=5").await;
    assert_eq!((whole.ids(), own.ids()), (vec![(2, 1)], vec![(2, 1)]));

    // Wednesday: dialog 1 is consented; its message is older than the tokens' position.
    app.consent(1, true).await;
    drain(&mut flusher).await;
    let monday = app.get_json("/data/?customerId=5").await["results"][1].clone();
    assert_eq!(monday["dialogId"], 1);

    for token in [&whole.resume, &own.resume] {
        let next = export(&app, &format!("resume={token}")).await;
        assert_eq!(next.messages, std::slice::from_ref(&monday));
        assert!(
            export(&app, &format!("resume={}", next.resume))
                .await
                .messages
                .is_empty()
        );
    }
    // A fresh export sends both, oldest first.
    assert_eq!(export(&app, "").await.ids(), [(1, 1), (2, 1)]);
}

#[tokio::test]
async fn time_ranges_are_exclusive_and_counted_exactly_in_every_mode() {
    let app = spawn_api_only(test_settings()).await;
    let month = 31 * 86_400 * 1_000_000_i64;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1_000_000;
    // Messages a year back (the partition from before partitioning), this month, and
    // one, two and three months ahead (partitions made as the flush needs them).
    let mut rows = Vec::new();
    for (i, at) in [
        now - 12 * month,
        now - 1_000_000,
        now,
        now + month,
        now + 2 * month,
        now + 3 * month,
    ]
    .into_iter()
    .enumerate()
    {
        let i = i as i64;
        for k in 0..4 {
            let language = if k % 2 == 0 { "EN" } else { "de" };
            rows.push((1 + k % 2, 10 * i + k, 1, language, at + k));
        }
    }
    store_granted(&app, &rows).await;
    // Bounds just before, at and just after messages (the first of each month), and
    // between months.
    let mut bounds: Vec<Option<i64>> = vec![None];
    for r in rows.iter().step_by(4) {
        bounds.extend([Some(r.4 - 1), Some(r.4), Some(r.4 + 1)]);
    }
    bounds.extend([Some(now - 6 * month), Some(now + month / 2), Some(now + 10 * month)]);
    let filters = ["", "&customerId=1", "&language=de", "&customerId=2&language=EN"];
    let mut checked = 0;
    for (i, after) in bounds.iter().enumerate() {
        for (j, before) in bounds.iter().enumerate().skip(i % 4).step_by(4) {
            {
                let filter = filters[(i + j) % filters.len()];
                let mut query = String::new();
                if let Some(a) = after {
                    query += &format!("&receivedAfter={}", iso(*a));
                }
                if let Some(b) = before {
                    query += &format!("&receivedBefore={}", iso(*b));
                }
                query += filter;
                let expected: Vec<(i64, i64)> = rows
                    .iter()
                    .filter(|r| after.is_none_or(|a| r.4 > a) && before.is_none_or(|b| r.4 < b))
                    .filter(|r| !filter.contains("customerId=1") || r.0 == 1)
                    .filter(|r| !filter.contains("customerId=2") || r.0 == 2)
                    .filter(|r| !filter.contains("language=de") || r.3 == "de")
                    .filter(|r| !filter.contains("language=EN") || r.3 == "EN")
                    .map(|r| (r.1, r.2))
                    .collect();
                let page = app.get_json(&format!("/data/?pageSize=1000{query}")).await;
                assert_eq!(page["count"], expected.len(), "{query}");
                let mut got: Vec<(i64, i64)> = page["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| (m["dialogId"].as_i64().unwrap(), m["seq"].as_i64().unwrap()))
                    .collect();
                got.reverse();
                assert_eq!(got, expected, "{query}");
                let mut cursor = Vec::new();
                let mut url = format!("/data/?cursor=&pageSize=3{query}");
                loop {
                    let step = app.get_json(&url).await;
                    cursor.extend(
                        step["results"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|m| (m["dialogId"].as_i64().unwrap(), m["seq"].as_i64().unwrap())),
                    );
                    match step["next"].as_str() {
                        Some(next) => url = next.trim_start_matches(&app.base).to_owned(),
                        None => break,
                    }
                }
                cursor.reverse();
                assert_eq!(cursor, expected, "cursor mode {query}");
                assert_eq!(export(&app, &query).await.ids(), expected, "export {query}");
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "{checked}");
    // A range whose start is not before its end holds nothing.
    let page = app
        .get_json(&format!(
            "/data/?receivedAfter={}&receivedBefore={}",
            iso(now),
            iso(now)
        ))
        .await;
    assert_eq!(
        (page["count"].as_i64(), page["results"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );
    // Offsets, and a `+` sent unencoded (a space once decoded).
    let plus = app.get_json("/data/?receivedAfter=2000-01-01T01:00:00%2B01:00").await;
    let space = app.get_json("/data/?receivedAfter=2000-01-01T01:00:00+01:00").await;
    assert_eq!(plus["count"], rows.len());
    assert_eq!(space["count"], rows.len());
}

/// A range's count comes from monthly, daily and ten-minute counters and at most five
/// minutes of rows at either end (or ten of a short range). Cut at, just before and just
/// after day, slot and half-slot marks, within one slot and across slots, days and months
/// (a whole month between), every filter form counts exactly, before and after refusals
/// take messages away; the fine counters always match the rows.
#[tokio::test]
async fn range_counts_are_exact_wherever_a_range_cuts_a_day_or_a_slot() {
    let app = spawn_api_only(test_settings()).await;
    const MINUTE: i64 = 60_000_000;
    let us = |at: time::OffsetDateTime| (at.unix_timestamp_nanos() / 1000) as i64;
    let now = time::OffsetDateTime::now_utc();
    let next_month = month_start(month_start(now) + time::Duration::days(32));
    let month_after = month_start(next_month + time::Duration::days(32));
    let yesterday = us(now) - us(now).rem_euclid(1440 * MINUTE) - 1440 * MINUTE;
    // Around yesterday's start, and the starts of the next two months.
    let mut points = Vec::new();
    for base in [yesterday, us(next_month), us(month_after)] {
        for minutes in [-1440, -10, -5, -2, 0, 3, 5, 10, 725, 1440] {
            for nudge in [-1, 0, 1] {
                points.push(base + minutes * MINUTE + nudge);
            }
        }
    }
    let mut rows = Vec::new();
    for (i, at) in points.iter().enumerate() {
        let i = i as i64;
        for k in 0..3 {
            let language = if k % 2 == 0 { "EN" } else { "de" };
            rows.push((1 + k % 2, 10 * i + k, 1, language, *at));
        }
    }
    store_granted(&app, &rows).await;
    let mut bounds: Vec<Option<i64>> = vec![None];
    bounds.extend(points.iter().map(|p| Some(*p)));
    bounds.extend([Some(yesterday + 7 * MINUTE), Some(yesterday + 181 * MINUTE)]);
    let filters = ["", "&customerId=1", "&language=de", "&customerId=2&language=EN"];
    let check = async |rows: &[(i64, i64, i64, &str, i64)], stride: usize| {
        let mut checked = 0;
        for (i, after) in bounds.iter().enumerate() {
            for (j, before) in bounds.iter().enumerate().skip(i % stride).step_by(stride) {
                let filter = filters[(i + j) % filters.len()];
                let mut query = String::new();
                if let Some(a) = after {
                    query += &format!("&receivedAfter={}", iso(*a));
                }
                if let Some(b) = before {
                    query += &format!("&receivedBefore={}", iso(*b));
                }
                query += filter;
                let expected = rows
                    .iter()
                    .filter(|r| after.is_none_or(|a| r.4 > a) && before.is_none_or(|b| r.4 < b))
                    .filter(|r| !filter.contains("customerId=1") || r.0 == 1)
                    .filter(|r| !filter.contains("customerId=2") || r.0 == 2)
                    .filter(|r| !filter.contains("language=de") || r.3 == "de")
                    .filter(|r| !filter.contains("language=EN") || r.3 == "EN")
                    .count();
                let page = app.get_json(&format!("/data/?pageSize=1{query}")).await;
                assert_eq!(page["count"], expected, "{query}");
                checked += 1;
            }
        }
        assert_fine_counts_exact(&app.store).await;
        checked
    };
    assert!(check(&rows, 3).await > 2500);

    // Refusals erase the first message of every other point.
    let refused: Vec<i64> = (0..points.len() as i64).step_by(2).map(|i| 10 * i).collect();
    let states: Vec<_> = refused.iter().map(|&dialog| refusal_of(dialog, 1, 2)).collect();
    app.store.apply(&states).await.unwrap();
    rows.retain(|r| !refused.contains(&r.1));
    assert!(check(&rows, 7).await > 1000);
}

#[tokio::test]
async fn bad_instants_limits_and_tokens_are_400() {
    let app = spawn_api_only(test_settings()).await;
    store_granted(&app, &[(1, 1, 1, "EN", T), (1, 1, 2, "EN", T + 1)]).await;
    for bad in [
        "yesterday",
        "2026-13-01T00:00:00Z",
        "2026-11-27",
        "2026-11-27T18:04:05",
        "1795000000",
        "%00",
    ] {
        for path in ["/data/?", "/data/?cursor=&", "/data/export?"] {
            for name in ["receivedAfter", "receivedBefore"] {
                assert_problem(
                    app.get(&format!("{path}{name}={bad}")).await,
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                )
                .await;
            }
        }
    }
    for bad in ["limit=-1", "limit=x", "limit=1.5", "customerId=-1", "language=english"] {
        assert_problem(
            app.get(&format!("/data/export?{bad}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        )
        .await;
    }
    let token = export(&app, "limit=1").await.resume;
    let mut forged = vec![
        "x".to_owned(),
        "00".repeat(40),
        token[..token.len() - 2].to_owned(),
        format!("{token}00"),
        token.to_uppercase().replace('E', "F"),
    ];
    // Every single change of a character.
    for i in (0..token.len()).step_by(7) {
        let mut t = token.clone().into_bytes();
        t[i] = if t[i] == b'a' { b'b' } else { b'a' };
        forged.push(String::from_utf8(t).unwrap());
    }
    // A GET /data cursor is not a resume token.
    let step = app.get_json("/data/?cursor=&pageSize=1").await;
    forged.push(
        step["next"]
            .as_str()
            .unwrap()
            .rsplit("cursor=")
            .next()
            .unwrap()
            .to_owned(),
    );
    for bad in forged {
        assert_problem(
            app.get(&format!("/data/export?resume={bad}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        )
        .await;
    }
    // The token still works after all that.
    assert_eq!(export(&app, &format!("resume={token}")).await.ids(), [(1, 2)]);
}

#[tokio::test]
async fn an_export_is_compressed_when_accepted() {
    let app = spawn_api_only(test_settings()).await;
    let rows: Vec<(i64, i64, i64, &str, i64)> = (0..2500).map(|i| (1, 1 + i / 100, 1 + i % 100, "EN", T + i)).collect();
    store_granted(&app, &rows).await;
    let plain = app.get("/data/export").await.text().await.unwrap();
    for (coding, decode) in [
        (
            "gzip",
            (|b: &[u8]| {
                let mut out = String::new();
                flate2::read::GzDecoder::new(b).read_to_string(&mut out).unwrap();
                out
            }) as fn(&[u8]) -> String,
        ),
        ("zstd", |b: &[u8]| {
            String::from_utf8(zstd::decode_all(b).unwrap()).unwrap()
        }),
    ] {
        let response = app
            .http
            .get(format!("{}/data/export", app.base))
            .header("accept-encoding", coding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-encoding"], coding);
        assert_eq!(response.headers()["content-type"], "application/x-ndjson");
        let bytes = response.bytes().await.unwrap();
        assert!(
            bytes.len() < plain.len() / 3,
            "{coding}: {} of {}",
            bytes.len(),
            plain.len()
        );
        let body = decode(&bytes);
        let lines = lines_of(&body);
        assert_eq!(lines.messages.len(), 2500);
        // The same messages (the resume tokens differ: each export closes an epoch).
        assert_eq!(
            body.rsplit_once("{\"resume\"").unwrap().0,
            plain.rsplit_once("{\"resume\"").unwrap().0
        );
    }
}

/// Two flushers commit concurrently, out of order and with messages older than ones
/// already exported, while a reader syncs with resume tokens: it receives every stored
/// message exactly once.
#[tokio::test]
async fn concurrent_flushes_while_syncing_skip_and_repeat_nothing() {
    let app = spawn_api_only(test_settings()).await;
    let writer = |first: i64| {
        let store = app.store.clone();
        tokio::spawn(async move {
            for batch in 0..60_i64 {
                let rows: Vec<(i64, i64, i64, &str, i64)> = (0..20_i64)
                    .map(|i| {
                        let dialog = first + batch * 20 + i;
                        // Times scattered backwards and forwards around T.
                        (
                            dialog % 4,
                            dialog,
                            1,
                            "EN",
                            T + ((dialog * 7919) % 5000) * 1000 - batch * 10_000,
                        )
                    })
                    .collect();
                store.apply(&states_of(&rows, "")).await.unwrap();
            }
        })
    };
    let (a, b) = (writer(1_000_000), writer(2_000_000));
    let mut token = String::new();
    let mut received = Vec::new();
    let mut customer_token = String::new();
    let mut customer = Vec::new();
    while !(a.is_finished() && b.is_finished()) {
        received.extend(sync(&app, "", &mut token, 37).await);
        customer.extend(sync(&app, "customerId=3", &mut customer_token, 11).await);
    }
    a.await.unwrap();
    b.await.unwrap();
    received.extend(sync(&app, "", &mut token, 37).await);
    customer.extend(sync(&app, "customerId=3", &mut customer_token, 11).await);

    let unique: BTreeSet<(i64, i64)> = received.iter().copied().collect();
    assert_eq!(unique.len(), received.len(), "a message was sent twice");
    assert_eq!(unique.len(), 2 * 60 * 20);
    let unique_customer: BTreeSet<(i64, i64)> = customer.iter().copied().collect();
    assert_eq!(unique_customer.len(), customer.len());
    let expected: BTreeSet<(i64, i64)> = unique.iter().copied().filter(|(d, _)| d % 4 == 3).collect();
    assert_eq!(unique_customer, expected);
}

/// A refusal whose 200 arrives while an export streams: nothing of its dialog is sent
/// after it; and an erased customer's messages are not sent at all.
#[tokio::test]
async fn a_refusal_during_a_stream_and_an_erasure_remove_their_messages() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    // 3000 messages of 8 KiB: each step of the stream (1000) is larger than what the
    // connection buffers, so the stream waits for the reader between steps.
    let pad = "x".repeat(8 * 1024);
    let rows: Vec<(i64, i64, i64, &str, i64)> = (0..3000).map(|i| (1, 1 + i / 100, 1 + i % 100, "EN", T + i)).collect();
    app.store.apply(&states_of(&rows, &pad)).await.unwrap();
    // Dialog 900 (customer 9) is consented through the API, received last.
    app.stage(9, 900, "to be refused", "EN").await;
    app.consent(900, true).await;
    drain(&mut flusher).await;

    let mut response = app.get("/data/export").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut text = Vec::new();
    while !text.contains(&b'\n') {
        text.extend_from_slice(&response.chunk().await.unwrap().unwrap());
    }
    let refused = app.consent(900, false).await;
    assert_eq!(refused.status(), StatusCode::OK);
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.extend_from_slice(&chunk);
    }
    let sent = lines_of(&String::from_utf8(text).unwrap());
    assert_eq!(sent.messages.len(), 3000);
    assert!(sent.ids().iter().all(|(d, _)| *d != 900));

    // Customer 1 erased: nothing of it in a fresh export, nor in a resumed one.
    let response = app
        .http
        .delete(format!("{}/customers/1", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let after = export(&app, "").await;
    assert!(after.messages.is_empty(), "{:?}", after.ids());
    assert!(
        export(&app, &format!("resume={}", sent.resume))
            .await
            .messages
            .is_empty()
    );
}

/// Retention dropping the partition a token points into: the token continues.
#[tokio::test]
async fn a_token_into_a_dropped_partition_continues() {
    let app = spawn_api_only(test_settings()).await;
    let day = 86_400 * 1_000_000_i64;
    let now = time::OffsetDateTime::now_utc();
    let now_us = now.unix_timestamp() * 1_000_000;
    // Two messages two years back (in the partition from before partitioning), one 300
    // days ahead.
    store_granted(
        &app,
        &[
            (1, 1, 1, "EN", now_us - 730 * day),
            (1, 1, 2, "EN", now_us - 730 * day + 1),
            (1, 2, 1, "EN", now_us + 300 * day),
        ],
    )
    .await;
    let first = export(&app, "limit=1").await;
    assert_eq!(first.ids(), [(1, 1)]);
    // A year from now, with a retention of 200 days: every partition before that drops.
    let done = app
        .store
        .maintain_partitions(
            now + time::Duration::days(365),
            Some(std::time::Duration::from_secs(200 * 86_400)),
        )
        .await
        .unwrap();
    assert!(
        done.dropped.contains(&"messages_before".to_owned()),
        "{:?}",
        done.dropped
    );
    assert_eq!(export(&app, &format!("resume={}", first.resume)).await.ids(), [(2, 1)]);
}
