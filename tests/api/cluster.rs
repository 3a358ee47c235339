//! Against a Redis Cluster only (scripts/test-cluster runs these, alone, against
//! scripts/redis-cluster; the default profile leaves them out): a primary killed during
//! traffic.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dapi::config::Settings;
use dapi::staging::keys::key_slot;
use tokio_util::sync::CancellationToken;

use crate::harness::{Ledger, drive};
use crate::helpers::{TestApp, assert_problem, redis_cluster, spawn_full, test_settings, wait_until};

/// dapi with its flushers against the local Redis Cluster (`scripts/test-cluster` sets
/// the tests up to reach it).
async fn spawn_on_cluster(settings: Settings) -> TestApp {
    assert!(
        redis_cluster(),
        "run by scripts/test-cluster, against scripts/redis-cluster"
    );
    spawn_full(settings).await
}

/// A connection of its own to the cluster node on `port` (not a cluster connection).
async fn connect_node(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The port of the primary that serves `key`'s slot, asked of the cluster itself.
async fn primary_of(key: &str) -> u16 {
    let slot = i64::from(key_slot(key.as_bytes()));
    let mut conn = connect_node(7000).await;
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await.unwrap();
    for range in slots {
        let redis::Value::Array(fields) = range else { continue };
        let (Some(redis::Value::Int(low)), Some(redis::Value::Int(high)), Some(redis::Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        if (*low..=*high).contains(&slot)
            && let Some(redis::Value::Int(port)) = primary.get(1)
        {
            return u16::try_from(*port).unwrap();
        }
    }
    panic!("no primary serves slot {slot}");
}

#[tokio::test]
async fn a_primary_killed_during_traffic_loses_nothing_acknowledged_with_wait_replicas_1() {
    let mut settings = test_settings();
    settings.redis_wait_replicas = 1;
    let app = spawn_on_cluster(settings).await;
    let ledger = Arc::new(Ledger::default());
    let bases = Arc::new(Mutex::new(vec![app.base.clone()]));
    let load = tokio::spawn(drive(bases, 7000..7096, 30, ledger.clone(), CancellationToken::new()));
    ledger.wait_for_acked(400).await;

    // Kill the primary of a shard the load writes to, mid-load, the way a crash would.
    let victim = primary_of(&app.keys.flush_stream_of(7001)).await;
    let killed = Instant::now();
    let _ = connect_node(victim)
        .await
        .send_packed_command(redis::cmd("DEBUG").arg("SEGFAULT"))
        .await;
    // Its replica takes over; the killed node comes back as the new primary's replica,
    // which WAIT 1 needs for that shard's writes to be answered again.
    let restarted = tokio::task::spawn_blocking(move || {
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster"))
            .args(["restart-node", &victim.to_string()])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(restarted.success(), "the killed node did not rejoin");
    let back = killed.elapsed();

    load.await.unwrap();
    app.wait_for_empty_queue().await;
    ledger.verify(&app.store).await;
    // 503s (with Retry-After) while the shard had no primary or no replica; never a 500.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("dapi_http_requests_total") && l.contains("status=\"5") && !l.contains("status=\"503\"")
        })
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let unavailable: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("dapi_http_requests_total") && l.contains("status=\"503\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(unavailable > 0, "the failover went unnoticed: was the primary killed?");
    assert!(
        ledger.acked_messages() >= 96 * 30 / 2,
        "{} acknowledged",
        ledger.acked_messages()
    );
    eprintln!("primary :{victim} killed; back as a replica after {back:?}; {unavailable} answers 503");
    // The cluster is whole again for whatever runs next.
    wait_until(Duration::from_secs(30), async || {
        let ok = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster"))
            .arg("status")
            .output()
            .map_err(|e| e.to_string())?;
        ok.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&ok.stdout).into_owned())
    })
    .await;
}

#[tokio::test]
async fn scripts_flushed_from_every_node_are_loaded_again_by_the_next_call() {
    // A replica promoted after a restart has an empty script cache: every node's cache
    // emptied at once is the same for every shard.
    let app = spawn_on_cluster(test_settings()).await;
    assert_eq!(app.stage(1, 7201, "before", "EN").await, 1);

    for port in 7000..=7005 {
        let mut node = connect_node(port).await;
        let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut node).await.unwrap();
    }

    let ingest = redis::Script::new(include_str!("../../src/staging/lua/ingest.lua"));
    let primary = primary_of(&app.keys.meta(7201)).await;
    let mut node = connect_node(primary).await;
    let mut loaded = async || -> Vec<i64> {
        redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(ingest.get_hash())
            .query_async(&mut node)
            .await
            .unwrap()
    };
    assert_eq!(loaded().await, [0], "the cache was emptied");

    assert_eq!(
        app.stage(1, 7201, "after", "EN").await,
        2,
        "ingest loaded its script again"
    );
    assert_eq!(loaded().await, [1]);
    assert_eq!(app.consent(7201, true).await.status(), reqwest::StatusCode::ACCEPTED);
    app.wait_for_seqs(7201, &[1, 2]).await; // and the flusher its scripts
}

#[tokio::test]
async fn readiness_fails_while_the_primary_of_any_shard_does_not_answer() {
    let app = spawn_on_cluster(test_settings()).await;
    assert_eq!(app.get("/readyz").await.status(), reqwest::StatusCode::OK);

    // A primary that serves some shard but not shard 0 (the one node readiness asked
    // before), made to stop answering clients for a while: the cluster bus goes on, so no
    // failover replaces it, as with a node stuck on a slow disk.
    let first = primary_of(&app.keys.flush_stream(0)).await;
    let mut other = None;
    for shard in 1..dapi::staging::keys::SHARDS {
        let port = primary_of(&app.keys.flush_stream(shard)).await;
        if port != first {
            other = Some(port);
            break;
        }
    }
    let stuck = other.expect("the shards span more than one primary");
    let mut node = connect_node(stuck).await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("ALL")
        .query_async(&mut node)
        .await
        .unwrap();

    let during = assert_problem(
        app.get("/readyz").await,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
    )
    .await;
    assert!(during["detail"].as_str().unwrap().contains("Redis"), "{during}");

    // Ready again once the node answers.
    wait_until(Duration::from_secs(15), async || {
        let status = app.get("/readyz").await.status();
        (status == reqwest::StatusCode::OK)
            .then_some(())
            .ok_or_else(|| status.to_string())
    })
    .await;
}
