//! Waiting for Redis replicas (`DAPI_REDIS_WAIT_REPLICAS`), for many requests at once.
//!
//! `WAIT n` blocks the connection it is sent on until n replicas have everything the
//! primary had when that connection last wrote. Sent after each request's write on the
//! shared request connection, it held every command pipelined behind it: with one
//! replica, throughput fell to a third (BENCHMARKS.md, "Waiting for Redis replicas"). Here one
//! task owns a connection of its own and answers waiters in rounds: a round writes a
//! fence (`INCR` of one fixed key) and then `WAIT`s on that same connection. Replication
//! is one ordered stream per primary, so replicas that hold the fence hold every write
//! the primary took before it — among them every waiter's write, which had been answered
//! before the waiter asked. A waiter is only ever answered by a round begun after it
//! asked. Fence and `WAIT` go in one pipeline, on one connection, so a reconnect cannot
//! split them. On a Redis Cluster each primary replicates on its own: a round fences and
//! waits on the primary of each shard its waiters wrote to (the fence is a key of that
//! shard, and the pipeline is routed by it).
//!
//! What this does not cover (a review's finding, left open): the write and the fence go
//! on different connections. If, between a write and its round, the primary behind the
//! same address is replaced — restarted without persistence, or failed over behind a
//! stable DNS name or VIP — within the 2 s bound, the round confirms the new primary's
//! fence and the lost write is answered 202. Closing it needs the waiters' scripts and
//! the `WAIT` on one connection (batched on a few dedicated connections).

use std::time::Duration;

use super::{Connector, Keyspace, RedisConn, Shard, StagingError, Timeouts};
use crate::group_commit::{GroupCommit, Settings, Slot};

/// How long a round waits for the replicas before the writes it covers are answered 503
/// `replication_timeout`.
const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// One round's answer: how many replicas confirmed, or why Redis could not be asked.
type Confirmed = Result<usize, String>;

/// A handle on the waiting task; the task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(super) struct Replication {
    rounds: GroupCommit<Shard, Confirmed, std::convert::Infallible>,
    wanted: usize,
}

impl Replication {
    /// Starts the task on the current tokio runtime, with a connection of its own.
    pub(super) fn start(connector: &Connector, keys: Keyspace, wanted: usize) -> Result<Self, StagingError> {
        let conn = connector.connect(Timeouts {
            connect: Duration::from_secs(1),
            response: WAIT_TIMEOUT + Duration::from_secs(1),
        })?;
        // One round at a time, of every waiter that asked before it began.
        let settings = Settings {
            in_flight: 1,
            most: usize::MAX,
            weight: |_| 1,
            pace: Duration::ZERO,
        };
        let rounds = GroupCommit::start(settings, move |shards, slot| {
            round(conn.clone(), keys.clone(), wanted, shards, slot)
        });
        Ok(Self { rounds, wanted })
    }

    /// Returns once the replicas asked for hold every write this process had answered
    /// on `shard`'s primary before the call; [`StagingError::NotReplicated`] when they
    /// did not confirm in time.
    pub(super) async fn confirm(&self, shard: Shard) -> Result<(), StagingError> {
        match self.rounds.call(shard).await {
            Some(Ok(Ok(acked))) if acked >= self.wanted => Ok(()),
            Some(Ok(Ok(acked))) => Err(StagingError::NotReplicated {
                acked,
                wanted: self.wanted,
            }),
            Some(Ok(Err(_))) | None => Err(StagingError::NotReplicated {
                acked: 0,
                wanted: self.wanted,
            }),
        }
    }
}

/// One round: asks each slot group its waiters wrote to (one on one Redis, one per shard
/// on a cluster) at once, and answers each waiter its group's answer.
async fn round(
    conn: RedisConn,
    keys: Keyspace,
    wanted: usize,
    shards: Vec<Shard>,
    slot: Slot,
) -> Result<Vec<Confirmed>, std::convert::Infallible> {
    let _slot = slot;
    let mut groups: Vec<Shard> = shards.iter().map(|shard| keys.slot_group(*shard)).collect();
    groups.sort_unstable();
    groups.dedup();
    let asks = groups.iter().map(|&group| {
        // Any shard of the group names its primary; the group's own number is one.
        let fence = keys.replication_fence(group);
        ask(conn.clone(), fence, wanted)
    });
    let answers = futures_util::future::join_all(asks).await;
    Ok(shards
        .into_iter()
        .map(|shard| {
            let group = keys.slot_group(shard);
            let at = groups.iter().position(|&g| g == group).unwrap_or_default();
            answers.get(at).cloned().unwrap_or(Err("no answer".into()))
        })
        .collect())
}

/// One fence and `WAIT` on the primary of `fence`'s slot: in one pipeline, so both go on
/// one connection to that node (on a cluster the pipeline is routed by the fence's key;
/// `WAIT` alone would go to every primary).
async fn ask(mut conn: RedisConn, fence: String, wanted: usize) -> Confirmed {
    let wait_ms = u64::try_from(WAIT_TIMEOUT.as_millis()).unwrap_or(1000);
    let mut pipe = redis::pipe();
    pipe.cmd("INCR")
        .arg(&fence)
        .ignore()
        .cmd("WAIT")
        .arg(wanted)
        .arg(wait_ms);
    let asked = pipe.query_async::<(usize,)>(&mut conn);
    let confirmed: Confirmed = match tokio::time::timeout(WAIT_TIMEOUT + Duration::from_secs(1), asked).await {
        Ok(Ok((acked,))) => Ok(acked),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("Redis did not answer WAIT in time".to_owned()),
    };
    if let Err(e) = &confirmed {
        tracing::debug!(error = %e, "could not ask Redis's replicas");
    }
    confirmed
}
