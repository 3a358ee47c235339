//! The flusher: exactly once through interruptions, the epoch fence under races, and
//! the flush queue's timers: how long an entry waits before another flusher claims it,
//! and how a long batch keeps its entries its own.

use std::time::Duration;

use dapi::domain::{CustomerId, Decision, DialogId, DialogState};
use dapi::flusher::{Flusher, Outcome};
use dapi::staging::{FlushQueue, GROUP, Keyspace, SHARDS};
use futures_util::future::join_all;
use redis::AsyncCommands;
use reqwest::StatusCode;

use crate::helpers::{TestApp, connector, drain, meta_field, spawn_api_only, spawn_full, test_settings};

/// A flusher that takes over any pending entry at once.
fn flusher(app: &TestApp, consumer: &str) -> Flusher {
    Flusher::new(queue(app, consumer, Duration::ZERO), app.store.clone(), 64)
}

fn queue(app: &TestApp, consumer: &str, claim_idle: Duration) -> FlushQueue {
    FlushQueue::new(
        &connector(&app.settings),
        app.keys.clone(),
        consumer.to_owned(),
        claim_idle,
        Duration::from_millis(100),
        app.settings.staging_ttl,
    )
    .unwrap()
}

#[tokio::test]
async fn a_flush_interrupted_after_commit_and_run_again_writes_no_duplicate() {
    let app = spawn_api_only(test_settings()).await;
    for text in ["a", "b", "c"] {
        app.stage(1, 1, text, "EN").await;
    }
    app.consent(1, true).await;

    // A flusher commits to PostgreSQL and dies before acknowledging.
    let mut crashing = flusher(&app, "crashing");
    let batch = crashing.next_batch().await.unwrap().expect("the grant queued an entry");
    let applied = crashing.store_batch(&batch).await.unwrap();
    assert_eq!(applied.inserted, 3);
    drop(crashing);
    assert_eq!(app.staged_len(1).await, 3, "nothing was trimmed before the ack");

    // Another flusher takes the entry over and runs the batch again.
    let mut rescuer = flusher(&app, "rescuer");
    let outcome = rescuer.flush_once().await.unwrap();

    let Outcome::Flushed { entries, applied } = outcome else {
        panic!("the pending entry was not taken over: {outcome:?}");
    };
    assert_eq!((entries, applied.inserted), (1, 0));
    assert_eq!(app.stored_seqs(1).await, [1, 2, 3]);
    assert_eq!(app.get_json("/data/").await["count"], 3);
    assert_eq!(app.staged_len(1).await, 0, "written messages are trimmed from Redis");
    app.wait_for_empty_queue().await;
    assert_eq!(rescuer.flush_once().await.unwrap(), Outcome::Idle);
}

#[tokio::test]
async fn messages_that_arrive_during_a_flush_are_kept_and_flushed_next() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(1, 2, "first", "EN").await;
    app.consent(2, true).await;
    let mut flusher = flusher(&app, "only");
    let batch = flusher.next_batch().await.unwrap().unwrap();

    app.stage(1, 2, "during", "EN").await; // after the snapshot, before the finish
    let applied = flusher.store_batch(&batch).await.unwrap();
    flusher.finish_batch(&batch, &applied).await.unwrap();

    assert_eq!(app.stored_seqs(2).await, [1]);
    assert!(matches!(flusher.flush_once().await.unwrap(), Outcome::Flushed { .. }));
    assert_eq!(app.stored_seqs(2).await, [1, 2]);
}

#[tokio::test]
async fn racing_grants_and_refusals_leave_nothing_of_a_refused_dialog() {
    let mut settings = test_settings();
    settings.flushers = 4;
    settings.flush_batch = 8;
    let app = spawn_full(settings).await;

    let dialogs = 60;
    let outcomes = join_all((0..dialogs).map(|dialog| {
        let app = &app;
        async move {
            let mut kept: Vec<i64> = Vec::new();
            app.stage(dialog, dialog, "opening", "EN").await;
            for round in 0..8 {
                assert_eq!(app.consent(dialog, true).await.status(), StatusCode::ACCEPTED);
                kept.clear(); // what was staged before a refusal never comes back
                for _ in 0..2 {
                    kept.push(app.stage(dialog, dialog, "racing", "EN").await);
                }
                // Jitter, not a wait: varies how the dialogs' calls interleave.
                tokio::time::sleep(Duration::from_millis((dialog as u64 + round) % 3)).await;
                let last_round = round == 7;
                if !last_round || dialog % 2 == 0 {
                    assert_eq!(app.consent(dialog, false).await.status(), StatusCode::OK);
                    kept.clear();
                }
            }
            (dialog, kept)
        }
    }))
    .await;

    app.wait_for_empty_queue().await;
    let mut total = 0;
    for (dialog, kept) in outcomes {
        assert_eq!(app.stored_seqs(dialog).await, kept, "dialog {dialog}");
        total += kept.len();
    }
    assert_eq!(app.get_json("/data/").await["count"], total as i64);
}

#[tokio::test]
async fn gone_consumers_are_pruned_but_never_one_holding_entries() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(1, 1, "a", "EN").await;
    app.consent(1, true).await;
    // "holder" takes the entry and dies; "idle" reads nothing and dies.
    let mut holder = flusher(&app, "holder");
    assert!(holder.next_batch().await.unwrap().is_some());
    let mut idle = queue(&app, "idle", Duration::from_secs(60));
    assert!(idle.next_entries(10).await.unwrap().is_empty());
    let mut pruner = queue(&app, "pruner", Duration::from_secs(60));

    let deleted = pruner.prune_gone_consumers(Duration::ZERO).await.unwrap();

    // Every consumer that read a shard is in its group: "idle" goes from every group,
    // "holder" from every group but the one of the entry it holds.
    let holding = Keyspace::shard_of(1);
    let mut conn = app.redis.clone();
    let mut seen = 0;
    for shard in 0..SHARDS {
        let info: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(app.keys.flush_stream(shard))
            .arg(GROUP)
            .query_async(&mut conn)
            .await
            .unwrap();
        let names: Vec<String> = info.consumers.into_iter().map(|c| c.name).collect();
        let expected: &[&str] = if shard == holding { &["holder"] } else { &[] };
        assert_eq!(names, expected, "shard {shard}");
        seen += 1;
    }
    assert_eq!(seen, SHARDS);
    assert!(deleted >= usize::from(SHARDS), "{deleted} deletions");
}

/// Keeps tokio's clock still for as long as it lives: paused, and not auto-advancing.
/// Paused alone, the runtime would jump the clock to its next timer (a Redis response
/// timeout) whenever it waits on a socket; a running blocking task stops that, so this
/// one runs until the guard is dropped. Only `tokio::time::advance` moves time then.
struct StillClock {
    // Dropped with the guard: the blocking task's `recv` returns, and it ends.
    _release: std::sync::mpsc::Sender<()>,
}

impl StillClock {
    fn hold() -> StillClock {
        tokio::time::pause();
        let (guard, dropped) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = dropped.recv();
        });
        StillClock { _release: guard }
    }
}

#[tokio::test]
async fn an_entry_idle_past_the_claim_time_is_claimed_at_the_next_claim_round_half_that_time_on() {
    // Two clocks decide a claim: Redis's says whether an entry has been idle for the
    // claim time (XAUTOCLAIM's min-idle), the flusher's own (tokio's, paused here) says
    // when it next looks (every half claim time). Pause moves only the second: the
    // first is waited for, bounded.
    const CLAIM_IDLE: Duration = Duration::from_millis(800);
    let app = spawn_api_only(test_settings()).await;
    app.stage(1, 1, "a", "EN").await;
    app.consent(1, true).await;
    let mut dead = queue(&app, "dead", CLAIM_IDLE);
    assert_eq!(
        dead.next_entries(10).await.unwrap().len(),
        1,
        "the grant queued an entry"
    );
    let _clock = StillClock::hold();
    let mut rescuer = queue(&app, "rescuer", CLAIM_IDLE);
    assert!(
        rescuer.next_entries(10).await.unwrap().is_empty(),
        "an entry idle for less than the claim time was claimed"
    );

    // Redis's clock: real time.
    let mut conn = app.redis.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pending: redis::streams::StreamPendingCountReply = conn
            .xpending_count(app.keys.flush_stream_of(1), GROUP, "-", "+", 1)
            .await
            .unwrap();
        let idle = pending.ids.first().map(|entry| entry.last_delivered_ms as u128);
        if idle.is_some_and(|idle| idle >= CLAIM_IDLE.as_millis()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Redis has the entry idle for {idle:?} ms"
        );
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(20)))
            .await
            .unwrap();
    }

    // The flusher's clock: the entry is claimable now, but its next claim round is not due.
    assert!(
        rescuer.next_entries(10).await.unwrap().is_empty(),
        "claimed between rounds"
    );
    tokio::time::advance(CLAIM_IDLE / 2 - Duration::from_millis(1)).await;
    assert!(
        rescuer.next_entries(10).await.unwrap().is_empty(),
        "claimed between rounds"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    let claimed = rescuer.next_entries(10).await.unwrap();

    assert_eq!(
        claimed.iter().map(|e| e.dialog.map(|d| d.get())).collect::<Vec<_>>(),
        [Some(1)]
    );
}

#[tokio::test]
async fn a_fenced_flush_keeps_the_messages_it_did_not_write() {
    let app = spawn_api_only(test_settings()).await;
    for text in ["a", "b", "c"] {
        app.stage(1, 10, text, "EN").await;
    }
    app.consent(10, true).await;
    // Flusher A reads the dialog under the grant's epoch and is slow.
    let mut slow = crate::helpers::flusher(&app);
    let batch = slow.next_batch().await.unwrap().expect("the grant queued the dialog");

    // A second grant moves the epoch on, and another flusher commits the dialog's row
    // under it with none of its messages (its batch's byte budget went elsewhere).
    assert_eq!(app.consent(10, true).await.status(), StatusCode::ACCEPTED);
    let epoch: i64 = meta_field(&app, 10, "e").await.unwrap().parse().unwrap();
    let newer = DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(10),
        customer: CustomerId::from_stored(1),
        decision: Decision::Granted,
        epoch,
        decided_at_us: 0,
        unerased_refusal: None,
        messages: Vec::new(),
    };
    app.store.apply(&[newer]).await.unwrap();

    // A commits: fenced, so nothing of the dialog is written — and nothing trimmed.
    let applied = slow.store_batch(&batch).await.unwrap();
    assert_eq!((applied.fenced, applied.inserted), (1, 0));
    slow.finish_batch(&batch, &applied).await.unwrap();

    assert_eq!(
        app.staged_len(10).await,
        3,
        "the acknowledged messages are still staged"
    );
    drain(&mut slow).await;
    assert_eq!(app.stored_seqs(10).await, [1, 2, 3]);
}

/// An app whose flush entries are claimable after 300 ms of idleness.
async fn quick_claims() -> TestApp {
    let mut settings = test_settings();
    settings.flush_claim_idle = Duration::from_millis(300);
    spawn_api_only(settings).await
}

/// A flush queue of `app`'s with its claim idle time, reading briefly.
fn claiming_queue(app: &TestApp, name: &str) -> FlushQueue {
    FlushQueue::new(
        &connector(&app.settings),
        app.keys.clone(),
        name.to_owned(),
        app.settings.flush_claim_idle,
        Duration::from_millis(50),
        app.settings.staging_ttl,
    )
    .unwrap()
}

/// PostgreSQL made slow for these dialogs: their rows locked until the transaction ends.
async fn lock_dialogs(app: &TestApp, dialogs: &[i64]) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM dialogs WHERE dialog_id = ANY($1) FOR UPDATE")
        .bind(dialogs)
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

#[tokio::test]
async fn a_batch_kept_alive_is_not_claimed_by_another_flusher_however_long_it_runs() {
    let app = quick_claims().await;
    let queue = |name: &str| Flusher::new(claiming_queue(&app, name), app.store.clone(), 64);
    let (mut slow, mut other) = (queue("slow"), queue("other"));
    app.stage(1, 90, "a", "EN").await;
    app.consent(90, true).await;
    drain(&mut slow).await;
    app.stage(1, 90, "b", "EN").await;
    let batch = slow.next_batch().await.unwrap().unwrap();

    // PostgreSQL is slow: the dialog's row is locked for four claim idle times.
    let lock = lock_dialogs(&app, &[90]).await;
    let write = tokio::spawn(async move {
        let applied = slow.store_batch(&batch).await.unwrap();
        (slow, batch, applied)
    });
    tokio::time::sleep(Duration::from_millis(1200)).await; // Redis measures the idle time
    assert_eq!(
        other.flush_once().await.unwrap(),
        Outcome::Idle,
        "the batch was claimed"
    );
    lock.rollback().await.unwrap();

    let (mut slow, batch, applied) = write.await.unwrap();
    slow.finish_batch(&batch, &applied).await.unwrap();
    assert_eq!(app.stored_seqs(90).await, [1, 2]);
}

#[tokio::test]
async fn entries_read_for_later_batches_are_kept_alive_while_a_long_batch_runs() {
    let app = quick_claims().await;
    // Batches of one: a read takes one entry a shard, so with two dialogs of different
    // shards queued, one goes in the batch and the other waits, read, for the next.
    let (first, second) = (
        93,
        (94..)
            .find(|&d| Keyspace::shard_of(d) != Keyspace::shard_of(93))
            .unwrap(),
    );
    let mut slow = Flusher::new(claiming_queue(&app, "slow"), app.store.clone(), 1);
    for dialog in [first, second] {
        app.stage(1, dialog, "a", "EN").await;
        app.consent(dialog, true).await;
    }
    drain(&mut slow).await;
    for dialog in [first, second] {
        app.stage(1, dialog, "b", "EN").await;
    }
    let batch = slow.next_batch().await.unwrap().unwrap();
    assert_eq!(batch.entries.len(), 1);

    // PostgreSQL is slow: both dialogs' rows are locked for four claim idle times.
    let lock = lock_dialogs(&app, &[first, second]).await;
    let write = tokio::spawn(async move {
        let applied = slow.store_batch(&batch).await.unwrap();
        (slow, batch, applied)
    });
    tokio::time::sleep(Duration::from_millis(1200)).await; // Redis measures the idle time
    let claimed = claiming_queue(&app, "other").next_entries(10).await.unwrap();
    assert!(claimed.is_empty(), "claimed from the slow flusher: {claimed:?}");
    lock.rollback().await.unwrap();

    let (mut slow, batch, applied) = write.await.unwrap();
    slow.finish_batch(&batch, &applied).await.unwrap();
    drain(&mut slow).await;
    assert_eq!(app.stored_seqs(first).await, [1, 2]);
    assert_eq!(app.stored_seqs(second).await, [1, 2]);
}
