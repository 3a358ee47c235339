//! Every SQL statement dapi runs is planned for an index, in the generic plan too, and
//! no plan goes stale as the tables grow. Why both matter: `src/store/sql.rs`'s module
//! documentation ("Plans"). The first test prepares each statement of `store::sql::ALL`
//! on tables with realistic statistics, forces the generic plan and fails on any
//! sequential scan of `messages`, `dialogs` or the fine counters.

use dapi::store::sql::ALL;

use crate::helpers::{spawn_api_only, test_settings};

#[tokio::test]
async fn no_statement_scans_messages_or_dialogs_in_its_generic_plan() {
    let app = spawn_api_only(test_settings()).await;
    let mut conn = app.store.pool().acquire().await.unwrap();
    // 200k messages over 40k granted dialogs, 500 customers, a few languages, a year
    // back (the partition from before partitioning) and in each of the two partitions
    // ahead.
    sqlx::raw_sql(
        "INSERT INTO dialogs (dialog_id, customer_id, decision, epoch, decided_at)
         SELECT d, d % 500, 'granted', 1, now() FROM generate_series(1, 40000) d;
         INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at, message_id)
         SELECT d, s, d % 500, (ARRAY['EN', 'de', 'fr', 'pt-BR'])[1 + d % 4], 'text ' || d || ' ' || s,
                CASE WHEN d <= 30000 THEN now() - (d * 5 + s) * interval '1 minute'
                     ELSE (date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                          + (1 + (d - 30001) / 5000) * interval '1 month' + interval '1 day'
                          + ((d % 5000) * 5 + s) * interval '1 minute' END,
                CASE WHEN d % 2 = 0 THEN 'm-' || s END
         FROM generate_series(1, 40000) d, generate_series(1, 5) s;
         INSERT INTO message_counts_fine (customer_id, language, span, bucket, shard, n)
         SELECT coalesce(customer_id, -1), coalesce(language, ''), s.span, messages_bucket(received_at, s.span),
                (dialog_id % 16)::int2, count(*)
         FROM (SELECT customer_id, lower(language) AS language, received_at, dialog_id FROM messages) m,
              (VALUES (600), (86400)) s (span)
         GROUP BY s.span, messages_bucket(received_at, s.span), dialog_id % 16,
                  GROUPING SETS ((customer_id, language), (customer_id), (language), ());
         ANALYZE dialogs; ANALYZE messages; ANALYZE message_counts_fine;
         SET plan_cache_mode = force_generic_plan;",
    )
    .execute(&mut *conn)
    .await
    .unwrap();

    // The check itself must be able to fail: a statement no index serves is caught.
    let canary = generic_plan(&mut conn, "SELECT seq FROM messages WHERE text = $1").await;
    assert!(
        scans_a_whole_table(&canary),
        "the check missed a sequential scan:\n{canary}"
    );

    let mut failures = Vec::new();
    for (name, statement) in ALL {
        let plan = generic_plan(&mut conn, statement).await;
        if scans_a_whole_table(&plan) {
            failures.push(format!("{name}:\n{plan}"));
        }
    }
    assert!(
        failures.is_empty(),
        "generic plans with a sequential scan:\n\n{}",
        failures.join("\n\n")
    );

    // The erasure's transaction turns sequential scans off, and the flush's insert runs
    // in the same one: no statement may then need a disabled node (its cost, 10^10,
    // once made PostgreSQL JIT-compile the flush's insert on every execution).
    sqlx::raw_sql("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut disabled = Vec::new();
    for (name, statement) in ALL {
        let plan = generic_plan(&mut conn, statement).await;
        if total_cost(&plan) >= 1e9 {
            disabled.push(format!("{name}:\n{plan}"));
        }
    }
    assert!(
        disabled.is_empty(),
        "generic plans with a disabled node under enable_seqscan = off:\n\n{}",
        disabled.join("\n\n")
    );
}

/// The total cost on the plan's first line (`cost=startup..total`).
fn total_cost(plan: &str) -> f64 {
    plan.lines()
        .next()
        .and_then(|line| line.split("..").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|cost| cost.parse().ok())
        .unwrap_or_else(|| panic!("no cost in:\n{plan}"))
}

fn scans_a_whole_table(plan: &str) -> bool {
    ["messages", "dialogs", "message_counts_fine"]
        .iter()
        .any(|table| plan.contains(&format!("Seq Scan on {table}")))
}

/// `EXPLAIN EXECUTE` of `statement` prepared on `conn` (whose `plan_cache_mode` forces
/// the generic plan). The generic plan does not depend on the values: NULLs of the
/// parameters' types.
async fn generic_plan(conn: &mut sqlx::PgConnection, statement: &str) -> String {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE checked AS {statement}")))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("does not prepare: {e}\n{statement}"));
    let types: Vec<String> =
        sqlx::query_scalar("SELECT unnest(parameter_types)::text FROM pg_prepared_statements WHERE name = 'checked'")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let args: Vec<String> = types.iter().map(|t| format!("NULL::{t}")).collect();
    let execute = if args.is_empty() {
        "EXPLAIN EXECUTE checked".to_owned()
    } else {
        format!("EXPLAIN EXECUTE checked({})", args.join(", "))
    };
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(execute))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql("DEALLOCATE checked").execute(&mut *conn).await.unwrap();
    plan.join("\n")
}

/// The stale-plan case the generic-plan check above cannot see: statements first run
/// while the tables are tiny, then the tables grow with no ANALYZE (autovacuum off, as on
/// this machine); the same work must then add no sequential scan.
#[tokio::test]
async fn plans_made_on_a_small_table_do_not_scan_it_once_it_is_large() {
    use dapi::domain::{CustomerId, Decision, DialogId, DialogState, Refusal, StagedMessage};
    use dapi::store::{Filter, Store};

    let app = spawn_api_only(test_settings()).await;
    // One connection, so that every statement below runs on the connection whose
    // statement cache would hold a stale plan, and its statistics can be flushed.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&app.settings.database_url)
        .await
        .unwrap();
    let store = Store::from_pool(pool.clone());
    let state = |dialog: i64, decision: Decision, epoch: i64| DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(dialog),
        customer: CustomerId::from_stored(1),
        decision,
        epoch,
        decided_at_us: 0,
        unerased_refusal: (decision == Decision::Refused).then_some(Refusal {
            epoch,
            decided_at_us: 0,
        }),
        messages: vec![StagedMessage {
            seq: 1,
            received_at_us: 1_795_000_000_000_000 + dialog,
            language: "EN".into(),
            text: "t".into(),
            message_id: None,
        }],
    };
    let work = async |round: i64| {
        for i in 0..8 {
            let d = round * 100 + i;
            store.apply(&[state(d, Decision::Granted, 1)]).await.unwrap();
            store.apply(&[state(d, Decision::Refused, 2)]).await.unwrap();
            store.granted_dialog(DialogId::from_stored(d)).await.unwrap();
            store.page(&Filter::default(), 0, 10).await.unwrap();
            store.after(&Filter::default(), None, 10).await.unwrap();
        }
    };
    // Granted dialogs `first` … `last`, one message each.
    let grow = async |first: i64, last: i64| {
        sqlx::query(
            "WITH d AS (SELECT generate_series($1::int8, $2::int8) AS d),
                  g AS (INSERT INTO dialogs (dialog_id, customer_id, decision, epoch, decided_at)
                        SELECT d, 1, 'granted', 1, now() FROM d)
             INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at)
             SELECT d, 1, 1, 'EN', 't', now() FROM d",
        )
        .bind(first)
        .bind(last)
        .execute(&pool)
        .await
        .unwrap();
    };
    // A young store: a few hundred rows, never analysed.
    grow(500_000, 500_300).await;
    // More than five executions each: PostgreSQL would have settled on generic plans.
    work(1).await;
    grow(1_000_000, 1_100_000).await;
    let seq_scans = async || -> (i64, i64) {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query_as(
            "SELECT (SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'messages'),
                    (SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'dialogs')",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = seq_scans().await;

    work(2).await;

    let after = seq_scans().await;
    assert_eq!(
        after, before,
        "sequential scans of (messages, dialogs) on the large tables"
    );
}
