//! Retention by partition (`DAPI_RETENTION`, src/store/retention.rs): the migration from
//! the unpartitioned table, months dropped whole with exact counts, and dapi's "now"
//! moved forward instead of waiting months.

use std::time::Duration;

use dapi::domain::{CustomerId, Decision, DialogId, DialogState, Refusal, StagedMessage};
use dapi::store::retention::month_start;
use dapi::store::{Filter, Store, micros_of};
use time::OffsetDateTime;

use crate::cleanup::Cleanup;
use crate::helpers::{assert_fine_counts_exact, spawn_api_only, test_settings};

const DAY: Duration = Duration::from_secs(86_400);

/// A granted dialog of customer `dialog % 3` with one message per time in `at`, in turn
/// in English and German.
fn granted(dialog: i64, at: &[OffsetDateTime]) -> DialogState {
    DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(dialog),
        customer: CustomerId::from_stored(dialog % 3),
        decision: Decision::Granted,
        epoch: 1,
        decided_at_us: micros_of(at[0]),
        unerased_refusal: None,
        messages: at
            .iter()
            .enumerate()
            .map(|(i, &t)| StagedMessage {
                seq: i as i64 + 1,
                received_at_us: micros_of(t),
                language: if i % 2 == 0 { "EN" } else { "de" }.into(),
                text: format!("dialog {dialog} message {i}"),
                message_id: (i == 0).then(|| format!("m-{dialog}")),
            })
            .collect(),
    }
}

fn refused(dialog: i64, epoch: i64) -> DialogState {
    DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(dialog),
        customer: CustomerId::from_stored(dialog % 3),
        decision: Decision::Refused,
        epoch,
        decided_at_us: micros_of(OffsetDateTime::now_utc()),
        unerased_refusal: Some(Refusal {
            epoch,
            decided_at_us: micros_of(OffsetDateTime::now_utc()),
        }),
        messages: Vec::new(),
    }
}

/// Every count dapi answers (each filter form it keeps a counter for) next to what
/// counting the rows gives; they must be equal.
async fn counts(store: &Store) -> Vec<((i64, String), i64, i64)> {
    sqlx::query_as(
        "WITH rows AS (
             SELECT coalesce(customer_id, -1) AS customer_id, coalesce(language, '') AS language, count(*) AS n
             FROM (SELECT customer_id, lower(language) AS language FROM messages) m
             GROUP BY GROUPING SETS ((customer_id, language), (customer_id), (language), ())
         ), kept AS (
             SELECT customer_id, language, sum(n)::int8 AS n FROM message_counts GROUP BY 1, 2
         )
         SELECT (coalesce(r.customer_id, k.customer_id), coalesce(r.language, k.language)),
                coalesce(k.n, 0), coalesce(r.n, 0)
         FROM rows r FULL JOIN kept k USING (customer_id, language)
         ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
}

async fn assert_counts_exact(store: &Store) -> i64 {
    let counts = counts(store).await;
    for (form, kept, rows) in &counts {
        assert_eq!(kept, rows, "count of {form:?}: kept {kept}, rows {rows}");
    }
    assert_fine_counts_exact(store).await;
    let (total, _) = store.page(&Filter::default(), 0, 1).await.unwrap();
    total
}

async fn partitions(store: &Store) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM message_partitions ORDER BY high")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

async fn stored(store: &Store) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT dialog_id, seq FROM messages ORDER BY 1, 2")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn whole_months_past_retention_are_dropped_and_counts_stay_exact() {
    let app = spawn_api_only(test_settings()).await;
    let store = &app.store;
    let now = OffsetDateTime::now_utc();
    let this_month = month_start(now);
    // A day into the n-th month after this one.
    let in_month = |n: i64| month_start(this_month + time::Duration::days(31 * n + 1)) + time::Duration::days(1);
    let first = partitions(store).await;
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first[0], "messages_before");

    // Now (the partition from before), in each of the next two months, and four months
    // ahead: no partition exists there yet, the write makes one and writes again.
    let applied = store
        .apply(&[
            granted(1, &[now, now]),
            granted(2, &[in_month(1), in_month(1), in_month(1)]),
            granted(3, &[in_month(2), in_month(2)]),
            granted(4, &[in_month(4), in_month(4) + time::Duration::hours(1)]),
        ])
        .await
        .unwrap();
    assert_eq!(applied.inserted, 9);
    assert_eq!(assert_counts_exact(store).await, 9);
    assert_eq!(partitions(store).await.len(), 5, "{:?}", partitions(store).await);

    // dapi's clock moved three months on and ten days, and the retention reaches back to
    // the start of the second month: the partition from before and next month's go whole.
    let later = month_start(in_month(3)) + time::Duration::days(10);
    let retention: Duration = (later - month_start(in_month(2))).try_into().unwrap();
    let done = store.maintain_partitions(later, Some(retention)).await.unwrap();
    assert_eq!(done.dropped.len(), 2, "{done:?}");
    assert_eq!(done.dropped[0], "messages_before");
    assert_eq!(stored(store).await, [(3, 1), (3, 2), (4, 1), (4, 2)]);
    assert_eq!(assert_counts_exact(store).await, 4);
    let (_, page) = store
        .page(
            &Filter {
                language: Some("de".into()),
                ..Filter::default()
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!(page.len(), 2, "one German message each of dialogs 3 and 4");
    // Two months ahead of the new "now": month 4 was made by the write, month 5 now.
    assert_eq!(done.created.len(), 1, "{done:?}");
    let again = store.maintain_partitions(later, Some(retention)).await.unwrap();
    assert_eq!(again, Default::default());

    // A flush of a message from a month already dropped stores nothing and counts nothing.
    let late = store.apply(&[granted(5, &[now])]).await.unwrap();
    assert_eq!(late.inserted, 0);
    // A refusal of a dialog in a kept month subtracts from that month's counts.
    let erased = store.apply(&[refused(3, 2)]).await.unwrap();
    assert_eq!(erased.erased, 2);
    assert_eq!(assert_counts_exact(store).await, 2);

    // Much later, everything goes but the months ahead; counts are zero, not negative.
    let much_later = later + time::Duration::days(400);
    store.maintain_partitions(much_later, Some(retention)).await.unwrap();
    assert!(stored(store).await.is_empty());
    assert_eq!(assert_counts_exact(store).await, 0);
    let left = partitions(store).await;
    assert!(left.len() >= 3, "the month of 'now' and two ahead at least: {left:?}");
}

/// Flushes and refusals running while months are dropped: each write lands either
/// before a drop (and goes with it) or after (and skips the dropped month); counts stay
/// exact throughout, and nothing deadlocks.
#[tokio::test]
async fn months_dropped_while_flushes_and_refusals_run_leave_counts_exact() {
    let app = spawn_api_only(test_settings()).await;
    let store = app.store.clone();
    let this_month = month_start(OffsetDateTime::now_utc());
    let in_month = move |n: i64| month_start(this_month + time::Duration::days(31 * n + 1)) + time::Duration::days(1);
    for dialog in 1..=40 {
        store
            .apply(&[granted(dialog, &[in_month(1), in_month(2)])])
            .await
            .unwrap();
    }

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for dialog in 41..=140 {
                store
                    .apply(&[granted(dialog, &[in_month(1), in_month(2)])])
                    .await
                    .unwrap();
                // Refuse an earlier dialog: its month-1 message may be gone already.
                store.apply(&[refused(dialog - 40, 2)]).await.unwrap();
            }
        })
    };
    let later = month_start(in_month(2)) + time::Duration::days(3);
    let retention: Duration = (later - month_start(in_month(2))).try_into().unwrap();
    let mut dropped = Vec::new();
    for _ in 0..20 {
        dropped.extend(store.maintain_partitions(later, Some(retention)).await.unwrap().dropped);
        assert_counts_exact(&store).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.unwrap();

    assert_eq!(dropped.len(), 2, "{dropped:?}");
    let months: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT messages_month(received_at)::int8 FROM messages")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(months.len(), 1, "only month 2 is left: {months:?}");
    // Dialogs 101..=140 were never refused: one month-2 message each.
    assert_eq!(assert_counts_exact(&store).await, 40);
}

/// A message from a clock years ahead fails its flush (retried, visible) instead of
/// creating a partition for every month up to it.
#[tokio::test]
async fn a_clock_years_ahead_creates_no_partitions_up_to_it() {
    let app = spawn_api_only(test_settings()).await;
    let before = partitions(&app.store).await;
    let far = OffsetDateTime::now_utc() + time::Duration::days(5 * 365);

    let failed = app.store.apply(&[granted(1, &[far])]).await;

    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(partitions(&app.store).await, before);
    assert!(stored(&app.store).await.is_empty());
}

#[tokio::test]
async fn without_retention_nothing_is_dropped() {
    let app = spawn_api_only(test_settings()).await;
    let now = OffsetDateTime::now_utc();
    app.store.apply(&[granted(1, &[now])]).await.unwrap();

    let far = now + time::Duration::days(3 * 365);
    let done = app.store.maintain_partitions(far, None).await.unwrap();

    assert!(done.dropped.is_empty());
    assert!(done.created.len() >= 34, "every month up to two after 'now': {done:?}");
    assert_eq!(stored(&app.store).await, [(1, 1)]);
}

type Row = (i64, i64, i64, String, String, OffsetDateTime, Option<String>);

async fn every_row(store: &Store) -> Vec<Row> {
    sqlx::query_as(
        "SELECT dialog_id, seq, customer_id, language, text, received_at, message_id FROM messages ORDER BY 1, 2",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// A store filled under the schema before partitioning (migrations 1–3), then migrated:
/// every row and every count as before, and the store goes on working.
#[tokio::test]
async fn migrating_to_partitions_keeps_every_row_and_every_count() {
    let settings = test_settings();
    let _cleanup = Cleanup::new(&settings);
    let store = Store::connect(&settings.database_url).await.unwrap();
    let migrator = sqlx::migrate!("./migrations");
    migrator.run_to(3, store.pool()).await.unwrap();
    // 3000 messages over two years up to now, in 600 dialogs of 7 customers, with the
    // counts the old schema kept, spread over its 16 shards.
    sqlx::raw_sql(
        "INSERT INTO dialogs (dialog_id, customer_id, decision, epoch, decided_at)
         SELECT d, d % 7, 'granted', 1, now() FROM generate_series(1, 600) d;
         INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at, message_id)
         SELECT g / 5 + 1, g % 5 + 1, (g / 5 + 1) % 7, (ARRAY['EN', 'de', 'fr', 'pt-BR'])[1 + g % 4],
                'old message ' || g, now() - g * interval '6 hours',
                CASE WHEN g % 2 = 0 THEN 'id-' || g END
         FROM generate_series(0, 2999) g;
         INSERT INTO message_counts (customer_id, language, shard, n)
         SELECT customer_id, language, shard, sum(n) FROM (
             SELECT coalesce(customer_id, -1) AS customer_id, coalesce(language, '') AS language,
                    (dialog_id % 16)::int2 AS shard, count(*) AS n
             FROM (SELECT customer_id, lower(language) AS language, dialog_id FROM messages) m
             GROUP BY dialog_id % 16, GROUPING SETS ((customer_id, language), (customer_id), (language), ())
         ) c GROUP BY 1, 2, 3;",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let rows_before = every_row(&store).await;
    let counts_before = counts(&store).await;
    // The old schema's own total, as dapi answered it before.
    let total_before: i64 =
        sqlx::query_scalar("SELECT sum(n)::int8 FROM message_counts WHERE customer_id = -1 AND language = ''")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(total_before, 3000);

    store.migrate().await.unwrap();

    let rows_after = every_row(&store).await;
    assert_eq!(rows_after, rows_before);
    // Migration 0005: each dialog's last seq, as the revival lookup reads it.
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dialogs d
         WHERE last_seq <> coalesce((SELECT max(seq) FROM messages m WHERE m.dialog_id = d.dialog_id), 0)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(wrong, 0);
    let found = store.granted_dialogs(&[DialogId::from_stored(8)]).await.unwrap();
    assert_eq!(found[&DialogId::from_stored(8)].last_seq, 5);
    assert_eq!(counts(&store).await, counts_before);
    assert_eq!(assert_counts_exact(&store).await, 3000);
    for (customer, language) in [(Some(3), None), (None, Some("PT-br")), (Some(5), Some("de"))] {
        let filter = Filter {
            language: language.map(str::to_owned),
            customer: customer.map(CustomerId::from_stored),
            ..Filter::default()
        };
        let (count, _) = store.page(&filter, 0, 1).await.unwrap();
        let expected = counts_before
            .iter()
            .find(|((c, l), _, _)| *c == customer.unwrap_or(-1) && *l == language.unwrap_or("").to_lowercase())
            .map_or(0, |(_, kept, _)| *kept);
        assert_eq!(count, expected, "{customer:?} {language:?}");
    }

    // It goes on working: a refusal of an old dialog, new messages, a retention pass.
    let erased = store.apply(&[refused(7, 2)]).await.unwrap();
    assert_eq!(erased.erased, 5);
    let now = OffsetDateTime::now_utc();
    let applied = store.apply(&[granted(1000, &[now, now])]).await.unwrap();
    assert_eq!(applied.inserted, 2);
    assert_eq!(assert_counts_exact(&store).await, 2997);
    let done = store.maintain_partitions(now, Some(3650 * DAY)).await.unwrap();
    assert!(done.dropped.is_empty(), "{done:?}");
    assert_eq!(assert_counts_exact(&store).await, 2997);
}

/// The keyset cursor reads only the partitions at or before its position: PostgreSQL
/// prunes the newer ones when it plans the page (dapi plans reads per call).
#[tokio::test]
async fn a_cursor_page_reads_no_partition_newer_than_its_position() {
    let app = spawn_api_only(test_settings()).await;
    let mut conn = app.store.pool().acquire().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET plan_cache_mode = force_custom_plan; PREPARE page AS {}",
        dapi::store::sql::AFTER_BY_CUSTOMER
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let mut plan = async |at: &str| -> String {
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN EXECUTE page(10, {at}, 1, 1, 7, '0001-01-01 00:00:00+00')"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        lines.join("\n")
    };
    let ahead = partitions(&app.store).await.pop().unwrap();

    let now = plan("now()").await;
    let far = plan("now() + interval '3 months'").await;

    assert!(now.contains("messages_before") && !now.contains(&ahead), "{now}");
    assert!(far.contains(&ahead), "{far}");
}

#[tokio::test]
async fn a_time_range_page_plans_only_the_partitions_around_its_range() {
    let app = spawn_api_only(test_settings()).await;
    let mut conn = app.store.pool().acquire().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET plan_cache_mode = force_custom_plan; PREPARE page AS {}",
        dapi::store::sql::PAGE_RANGE_BY_CUSTOMER
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    // A day's range ending at `end` (a SQL expression), with its ten-minute windows.
    let mut plan = async |end: &str| -> String {
        let (lo, hi) = (format!("({end}) - interval '1 day'"), format!("({end})"));
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN EXECUTE page(10, 0, NULL, 7, {lo}, {hi},
                 {lo} - interval '10 min', {lo} + interval '10 min',
                 {hi} - interval '10 min', {hi} + interval '10 min')"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        lines.join("\n")
    };
    let ahead = partitions(&app.store).await.pop().unwrap();
    let ahead_low: OffsetDateTime = sqlx::query_scalar("SELECT low FROM message_partitions WHERE name = $1")
        .bind(&ahead)
        .fetch_one(app.store.pool())
        .await
        .unwrap();

    let now = plan("now()").await;
    let far = plan(&format!("'{ahead_low}'::timestamptz + interval '10 days'")).await;

    assert!(now.contains("messages_before") && !now.contains(&ahead), "{now}");
    assert!(far.contains(&ahead) && !far.contains("messages_before"), "{far}");
}
