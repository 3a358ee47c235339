//! Keys of older releases (staging/upgrade.rs): written here as those releases wrote
//! them, then met by this one. Only on one Redis: no older release ran on a cluster
//! (scripts/test-cluster leaves these out).

use std::time::Duration;

use dapi::staging::keys::legacy;
use dapi::staging::{Keyspace, RedisConn, Staging};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_problem, connector, redis_conn, spawn_api_only, spawn_full, test_settings};

async fn run(conn: &mut RedisConn, cmd: &mut redis::Cmd) {
    let _: redis::Value = cmd.query_async(conn).await.unwrap();
}

async fn pttl(conn: &mut RedisConn, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// Writes a dialog as releases before the shards staged it: meta and messages under
/// `{d<id>}`, with the TTL given (`None`: none, as the first release left granted ones).
async fn legacy_dialog(
    conn: &mut RedisConn,
    prefix: &str,
    dialog: i64,
    decision: &str,
    texts: &[&str],
    ttl_ms: Option<u64>,
) {
    let meta = legacy::dialog_key(prefix, dialog, "meta");
    let msgs = legacy::dialog_key(prefix, dialog, "msgs");
    let queued = if decision == "g" { 1 } else { 0 };
    run(
        conn,
        redis::cmd("HSET")
            .arg(&meta)
            .arg(
                &[
                    "c",
                    "1",
                    "d",
                    decision,
                    "e",
                    "1700000000000000",
                    "t",
                    "1700000000000000",
                ][..],
            )
            .arg("n")
            .arg(texts.len())
            .arg("q")
            .arg(queued),
    )
    .await;
    for (i, text) in texts.iter().enumerate() {
        let item = format!("{}:1700000000{:06}:EN:{text}", i + 1, i);
        run(conn, redis::cmd("RPUSH").arg(&msgs).arg(item)).await;
    }
    if let Some(ttl) = ttl_ms {
        run(conn, redis::cmd("PEXPIRE").arg(&meta).arg(ttl)).await;
        run(conn, redis::cmd("PEXPIRE").arg(&msgs).arg(ttl)).await;
    }
}

#[tokio::test]
async fn keys_of_a_release_before_the_shards_move_and_nothing_staged_is_lost() {
    let settings = test_settings();
    let prefix = settings.redis_prefix.clone();
    let mut conn = redis_conn();
    // 80: granted, two messages, queued; its entry delivered to a consumer that died.
    legacy_dialog(&mut conn, &prefix, 80, "g", &["one", "two"], Some(600_000)).await;
    // 81: pending, one message.
    legacy_dialog(&mut conn, &prefix, 81, "p", &["hello"], Some(600_000)).await;
    // 82: refused, its erasure not confirmed (no expiry while so).
    legacy_dialog(&mut conn, &prefix, 82, "r", &[], None).await;
    run(
        &mut conn,
        redis::cmd("HSET")
            .arg(legacy::dialog_key(&prefix, 82, "meta"))
            .arg("x")
            .arg("5"),
    )
    .await;
    // 83: set aside by an older flusher.
    run(
        &mut conn,
        redis::cmd("RPUSH")
            .arg(legacy::dialog_key(&prefix, 83, "quarantined:msgs"))
            .arg("junk"),
    )
    .await;
    run(
        &mut conn,
        redis::cmd("HSET")
            .arg(legacy::quarantine_index(&prefix))
            .arg(83)
            .arg("1700000000 a reason"),
    )
    .await;
    let stream = legacy::flush_stream(&prefix);
    run(
        &mut conn,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg("flushers")
            .arg("0")
            .arg("MKSTREAM"),
    )
    .await;
    run(&mut conn, redis::cmd("XADD").arg(&stream).arg("*").arg("d").arg(80)).await;
    run(
        &mut conn,
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("flushers")
            .arg("old-and-dead")
            .arg("STREAMS")
            .arg(&stream)
            .arg(">"),
    )
    .await;

    let app = spawn_full(settings).await;

    app.wait_for_seqs(80, &[1, 2]).await;
    let keys = app.keys.clone();
    let page = app.get_json("/data/").await;
    // Newest first: seq 1 is the second; its text and time are the ones staged.
    assert_eq!(page["results"][1]["text"], "one", "{page}");
    assert_eq!(
        page["results"][1]["receivedAt"], "2023-11-14T22:13:20.000000Z",
        "{page}"
    );
    // 81 goes on where it was.
    assert_eq!(app.stage(1, 81, "again", "EN").await, 2);
    assert_eq!(app.consent(81, true).await.status(), StatusCode::ACCEPTED);
    app.wait_for_seqs(81, &[1, 2]).await;
    // 82's refusal still holds, and still waits for its erasure.
    let refused = app
        .post_json("/data/1/82", &json!({"text": "x", "language": "EN"}))
        .await;
    assert_problem(refused, StatusCode::CONFLICT, "consent_refused").await;
    // 83 is still set aside, and listed.
    assert!(app.quarantine_index().await.contains_key("83"));
    let mut conn = app.redis.clone();
    let kept: i64 = redis::cmd("EXISTS")
        .arg(keys.quarantined_msgs(83))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 1);
    // Nothing is left under the old names.
    let old: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:{{d*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(old.is_empty(), "{old:?}");
    for key in [legacy::flush_stream(&prefix), legacy::quarantine_index(&prefix)] {
        let left: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(left, 0, "{key}");
    }
    app.wait_for_empty_queue().await;
    assert_eq!(app.get_json("/data/").await["count"], 4);
}

#[tokio::test]
async fn an_api_process_moves_old_keys_before_it_stages_anything() {
    let settings = test_settings();
    let prefix = settings.redis_prefix.clone();
    let mut conn = redis_conn();
    legacy_dialog(&mut conn, &prefix, 90, "p", &["a", "b"], Some(600_000)).await;

    // No flusher here, so nothing moved the keys at start: the first request does.
    let app = spawn_api_only(settings).await;

    assert_eq!(
        app.stage(1, 90, "c", "EN").await,
        3,
        "the seq goes on: the old state was found"
    );
    assert_eq!(app.staged_len(90).await, 3);
}

#[tokio::test]
async fn keys_the_first_release_kept_without_expiry_get_their_ttl_once() {
    let settings = test_settings();
    let prefix = settings.redis_prefix.clone();
    let mut conn = redis_conn();
    // 70: granted as the first release left it, without expiry; 71: a refusal awaiting
    // its erasure, which must not expire.
    legacy_dialog(&mut conn, &prefix, 70, "g", &["a"], None).await;
    legacy_dialog(&mut conn, &prefix, 71, "r", &["b"], None).await;
    run(
        &mut conn,
        redis::cmd("HSET")
            .arg(legacy::dialog_key(&prefix, 71, "meta"))
            .arg("x")
            .arg(5),
    )
    .await;
    let app = spawn_api_only(settings).await;
    let staging = Staging::new(connector(&app.settings), &prefix, app.settings.staging_ttl).unwrap();

    let moved = staging.upgrade_layout().await.unwrap();

    assert_eq!(moved.expired, 1, "{moved:?}");
    assert_eq!(moved.dialog_keys, 4, "{moved:?}");
    let ttl = app.settings.staging_ttl.as_millis() as i64;
    for key in [app.keys.meta(70), app.keys.msgs(70)] {
        let left = pttl(&mut conn, &key).await;
        assert!(left > ttl - 60_000 && left <= ttl, "{key}: {left} ms left");
    }
    assert_eq!(
        pttl(&mut conn, &app.keys.meta(71)).await,
        -1,
        "an unerased refusal keeps no expiry"
    );
    // Once per Redis: the markers make later starts skip both walks.
    legacy_dialog(&mut conn, &prefix, 72, "g", &["c"], None).await;
    assert_eq!(staging.upgrade_layout().await.unwrap(), Default::default());
    assert_eq!(staging.expire_keys_older_releases_kept().await.unwrap(), 0);
    assert_eq!(pttl(&mut conn, &legacy::dialog_key(&prefix, 72, "meta")).await, -1);
}

#[tokio::test]
async fn a_move_that_meets_a_key_already_under_its_new_name_keeps_both() {
    let settings = test_settings();
    // No app here: this removes the keys (`<prefix>:*`, both layouts) at the end.
    let _cleanup = crate::cleanup::Cleanup::new(&settings);
    let prefix = settings.redis_prefix.clone();
    let mut conn = redis_conn();
    let keys = Keyspace::new(&prefix);
    legacy_dialog(&mut conn, &prefix, 95, "p", &["old"], Some(600_000)).await;
    run(
        &mut conn,
        redis::cmd("RPUSH").arg(keys.msgs(95)).arg("1:1700000000000000:EN:new"),
    )
    .await;
    let staging = Staging::new(connector(&settings), &prefix, Duration::from_secs(600)).unwrap();

    let moved = staging.upgrade_layout().await.unwrap();

    assert_eq!((moved.dialog_keys, moved.conflicts), (1, 1), "{moved:?}");
    let old: Vec<String> = redis::cmd("LRANGE")
        .arg(legacy::dialog_key(&prefix, 95, "msgs"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(old.len(), 1, "left for an operator, not overwritten");
}
