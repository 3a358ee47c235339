//! Connections to one Redis or to a Redis Cluster, behind one type.
//!
//! [`RedisConn`] is either redis-rs's `ConnectionManager` (one Redis, or a primary with
//! replicas) or its `cluster_async::ClusterConnection` (`DAPI_REDIS_CLUSTER=true`); both
//! are multiplexed, reconnect by themselves and are cheap to clone, and the enum
//! implements redis-rs's `ConnectionLike`, so every command, pipeline and script call in
//! dapi is written once. (svix-server does the same.) Both are made lazily: dapi starts
//! while Redis is away, and the first call connects.
//!
//! On a cluster:
//! - every script call and pipeline stays in one slot (the keyspace's shard tags see to
//!   that); a `MOVED` after a failover or a resharding is followed and the slot map
//!   refreshed by redis-rs;
//! - retries are capped at [`CLUSTER_RETRIES`]: redis-rs re-sends a request whose
//!   connection dropped, which is safe for dapi's scripts only because a `messageId`
//!   makes a repeat harmless, and a message without one could be staged twice on
//!   such a retry (as with any client retry);
//! - a script missing on a newly promoted primary (`NOSCRIPT`) is loaded by the wire's
//!   one runner of script calls (`wire::run`, with `Script::load_async`), which sends
//!   `SCRIPT LOAD` to every node;
//! - a connection that answers nothing at all for [`WEDGED_AFTER`] while requests go out
//!   is replaced by a new one. Measured here (redis-rs 1.8.1, Redis 7.0, a primary
//!   killed under 32 concurrent requests): in some runs the connection never answered
//!   again, on any node, after the failover had completed, whatever its retry count;
//!   a new connection to the same seeds works at once (`tests/api/cluster.rs`).
//!
//! A blocking read holds its node's connection: callers that block (the flushers) make
//! connections of their own with [`Connector::connect`], never a clone of the shared one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How often a cluster request is tried again after a redirect, a dropped connection or
/// a cluster that is electing a primary, before the caller hears of it.
pub const CLUSTER_RETRIES: u32 = 3;

/// How long a cluster connection may answer nothing while requests go out before it is
/// replaced (see the module doc).
pub const WEDGED_AFTER: Duration = Duration::from_secs(3);

/// Where Redis is, and how to connect to it.
#[derive(Debug, Clone)]
pub enum Connector {
    Single(Client),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// Timeouts of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Bound on one call; a blocking read must be allowed its block time on top.
    pub response: Duration,
}

impl Connector {
    /// `REDIS_URL`: one URL, or with `cluster` seed URLs separated by commas.
    pub fn new(url: &str, cluster: bool) -> RedisResult<Self> {
        if cluster {
            let seeds: Vec<String> = url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            // Checks the URLs now (nothing connects yet), so a bad one fails the start.
            ClusterClientBuilder::new(seeds.clone()).build()?;
            Ok(Connector::Cluster(seeds))
        } else {
            Ok(Connector::Single(Client::open(url)?))
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Connector::Cluster(_))
    }

    /// A new connection of its own, made on first use (needs a tokio runtime).
    pub fn connect(&self, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match self {
            Connector::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?))
            }
            Connector::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds.clone())
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(100)
                    .max_retry_wait(1000)
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    .overall_response_timeout(Some(timeouts.response * 2))
                    .build()?;
                Ok(RedisConn::Cluster(Arc::new(Cluster::new(client, timeouts))))
            }
        }
    }
}

/// A connection to one Redis or to a cluster; clones share it.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A cluster connection, replaced when it stops answering (see the module doc).
pub struct Cluster {
    client: ClusterClient,
    timeouts: Timeouts,
    current: RwLock<ClusterConnection>,
    started: Instant,
    /// Milliseconds since `started` of the first request sent since the last answer
    /// (0: none waiting), and of the last replacement.
    unanswered_since: AtomicU64,
    replaced_at: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    fn new(client: ClusterClient, timeouts: Timeouts) -> Self {
        let current = RwLock::new(Self::pending(&client, timeouts));
        Self {
            client,
            timeouts,
            current,
            started: Instant::now(),
            unanswered_since: AtomicU64::new(0),
            replaced_at: AtomicU64::new(0),
        }
    }

    /// A new connection, made in the background (needs a tokio runtime).
    fn pending(client: &ClusterClient, timeouts: Timeouts) -> ClusterConnection {
        // `with_config` replaces the builder's timeouts: give them again.
        let config = ClusterConfig::new()
            .set_connection_timeout(timeouts.connect)
            .set_response_timeout(timeouts.response);
        client.get_pending_async_connection_with_config(config)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The connection to send on: a new one if this one has answered nothing for
    /// [`WEDGED_AFTER`] while requests went out.
    fn connection(&self) -> ClusterConnection {
        let now = self.now_ms();
        let wedged = WEDGED_AFTER.as_millis() as u64;
        let since = match self
            .unanswered_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => now,
            Err(since) => since,
        };
        let replaced = self.replaced_at.load(Ordering::Acquire);
        if now.saturating_sub(since) > wedged
            && now.saturating_sub(replaced) > wedged
            && self
                .replaced_at
                .compare_exchange(replaced, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::warn!("the Redis Cluster connection answered nothing for {WEDGED_AFTER:?}; replacing it");
            let fresh = Self::pending(&self.client, self.timeouts);
            if let Ok(mut current) = self.current.write() {
                *current = fresh;
            }
            self.unanswered_since.store(now, Ordering::Release);
        }
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Notes how a request ended: any answer from a node (an error reply too) shows
    /// the connection works.
    fn observe<T>(&self, result: &RedisResult<T>) {
        let answered = match result {
            Ok(_) => true,
            Err(e) => {
                !(e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.kind() == redis::ErrorKind::ClusterConnectionNotFound)
            }
        };
        if answered {
            self.unanswered_since.store(0, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConn::Single(_) => "RedisConn::Single",
            RedisConn::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => {
                let cluster = c.clone();
                Box::pin(async move {
                    let result = cluster.connection().req_packed_command(cmd).await;
                    cluster.observe(&result);
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => {
                let cluster = c.clone();
                Box::pin(async move {
                    let result = cluster.connection().req_packed_commands(pipeline, offset, count).await;
                    cluster.observe(&result);
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}
