//! The flush queue at a glance (`/metrics`) and whether Redis answers (`/readyz`).

use std::time::Duration;

use super::{GROUP, SHARDS, Staging, StagingError};

/// A stream entry as XRANGE answers it: id and field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// The flush queue at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub length: u64,
    pub pending: u64,
    pub oldest_age: Duration,
}

impl Staging {
    /// The flush queue over every shard: entries in all streams, entries delivered but
    /// not acknowledged, and the age of the oldest entry (by Redis's clock), for
    /// `/metrics`. One pipeline per shard (a pipeline stays in one slot on a cluster).
    pub async fn queue_stats(&self) -> Result<QueueStats, StagingError> {
        let mut conn = self.conn.clone();
        let mut stats = QueueStats {
            length: 0,
            pending: 0,
            oldest_age: Duration::ZERO,
        };
        for shard in 0..SHARDS {
            let stream = self.keys.flush_stream(shard);
            let mut pipe = redis::pipe();
            pipe.cmd("TIME")
                .cmd("XLEN")
                .arg(&stream)
                .cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            let ((seconds, micros), length, first): ((u64, u64), u64, Vec<StreamEntry>) =
                self.bounded(pipe.query_async(&mut conn)).await?;
            stats.length += length;
            if length == 0 {
                continue;
            }
            let now_ms = seconds * 1000 + micros / 1000;
            let oldest_ms = first
                .first()
                .and_then(|(id, _)| id.split('-').next())
                .and_then(|ms| ms.parse::<u64>().ok());
            let age = Duration::from_millis(oldest_ms.map_or(0, |ms| now_ms.saturating_sub(ms)));
            stats.oldest_age = stats.oldest_age.max(age);
            // The pending count needs the group, which exists once a flusher has started.
            let mut summary = redis::cmd("XPENDING");
            summary.arg(&stream).arg(GROUP);
            stats.pending += match self.bounded(summary.query_async::<Vec<redis::Value>>(&mut conn)).await {
                Ok(summary) => summary
                    .first()
                    .and_then(|count| redis::from_redis_value_ref::<u64>(count).ok())
                    .unwrap_or_default(),
                Err(StagingError::Redis(e)) if e.code() == Some("NOGROUP") => 0,
                Err(e) => return Err(e),
            };
        }
        Ok(stats)
    }

    /// Answers whether Redis responds: on a cluster, whether every shard's slot does (a
    /// node down, or a slot no primary serves, fails the POSTs of that shard's dialogs
    /// while the others go on: readiness says so rather than ask one node).
    pub async fn ping(&self) -> Result<(), StagingError> {
        let shards = if self.connector.is_cluster() { SHARDS } else { 1 };
        let pings = (0..shards).map(|shard| async move {
            let mut conn = self.conn.clone();
            let mut ping = redis::cmd("EXISTS");
            ping.arg(self.keys.flush_stream(shard));
            self.bounded(ping.query_async::<i64>(&mut conn)).await
        });
        for answer in futures_util::future::join_all(pings).await {
            answer?;
        }
        Ok(())
    }
}
