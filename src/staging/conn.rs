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
//! - a script missing on a newly promoted primary (`NOSCRIPT`) is loaded by
//!   `ScriptInvocation::invoke_async`, which sends `SCRIPT LOAD` to every node.
//!
//! A blocking read holds its node's connection: callers that block (the flushers) make
//! connections of their own with [`Connector::connect`], never a clone of the shared one.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How often a cluster request is tried again after a redirect, a dropped connection or
/// a cluster that is electing a primary, before the caller hears of it.
pub const CLUSTER_RETRIES: u32 = 3;

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
                // `with_config` replaces the builder's timeouts: give them again.
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeouts.connect)
                    .set_response_timeout(timeouts.response);
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }
}

/// A connection to one Redis or to a cluster; clones share it.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
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
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}
