//! Waiting for Redis replicas (`DAPI_REDIS_WAIT_REPLICAS`), for many requests at once.
//!
//! `WAIT n` blocks the connection it is sent on until n replicas have everything the
//! primary had when that connection last wrote. Sent after each request's write on the
//! shared request connection, it held every command pipelined behind it: with one
//! replica, throughput fell to a third (BENCHMARKS.md, "Waiting for replicas"). Here one
//! task owns a connection of its own and answers waiters in rounds: a round writes a
//! fence (`INCR` of one fixed key) and then `WAIT`s on that same connection. Replication
//! is one ordered stream per primary, so replicas that hold the fence hold every write
//! the primary took before it — among them every waiter's write, which had been answered
//! before the waiter asked. A waiter is only ever answered by a round begun after it
//! asked. Fence and `WAIT` go in one pipeline, on one connection, so a reconnect cannot
//! split them.
//!
//! What this does not cover (a review's finding, left open): the write and the fence go
//! on different connections. If, between a write and its round, the primary behind the
//! same address is replaced — restarted without persistence, or failed over behind a
//! stable DNS name or VIP — within the 2 s bound, the round confirms the new primary's
//! fence and the lost write is answered 202. Closing it needs the waiters' scripts and
//! the `WAIT` on one connection (batched on a few dedicated connections).

use std::time::Duration;

use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

use super::StagingError;

/// How long a round waits for the replicas before the writes it covers are answered 503
/// `replication_timeout`.
const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// One round's answer: how many replicas confirmed, or why Redis could not be asked.
type Confirmed = Result<usize, String>;

/// A handle on the waiting task; the task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(super) struct Replication {
    queue: mpsc::UnboundedSender<oneshot::Sender<Confirmed>>,
    wanted: usize,
}

impl Replication {
    /// Starts the task on the current tokio runtime, with a connection of its own.
    pub(super) fn start(client: Client, fence: String, wanted: usize) -> Result<Self, StagingError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(WAIT_TIMEOUT + Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, fence, wanted, waiting));
        Ok(Self { queue, wanted })
    }

    /// Returns once the replicas asked for hold every write this process had answered
    /// before the call; [`StagingError::NotReplicated`] when they did not confirm in time.
    pub(super) async fn confirm(&self) -> Result<(), StagingError> {
        let (answer, answered) = oneshot::channel();
        self.queue.send(answer).map_err(|_| StagingError::Interrupted)?;
        match answered.await {
            Ok(Ok(acked)) if acked >= self.wanted => Ok(()),
            Ok(Ok(acked)) => Err(StagingError::NotReplicated {
                acked,
                wanted: self.wanted,
            }),
            Ok(Err(_)) | Err(_) => Err(StagingError::NotReplicated {
                acked: 0,
                wanted: self.wanted,
            }),
        }
    }
}

async fn run(
    mut conn: ConnectionManager,
    fence: String,
    wanted: usize,
    mut waiting: mpsc::UnboundedReceiver<oneshot::Sender<Confirmed>>,
) {
    let wait_ms = u64::try_from(WAIT_TIMEOUT.as_millis()).unwrap_or(1000);
    while let Some(first) = waiting.recv().await {
        let mut round = vec![first];
        while let Ok(next) = waiting.try_recv() {
            round.push(next);
        }
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
        for waiter in round {
            let _ = waiter.send(confirmed.clone());
        }
    }
}
