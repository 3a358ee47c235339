//! Keys that older releases left in Redis, brought up to this one's — once per Redis,
//! before this process stages or decides anything ([`Staging::prepare`]).
//!
//! - Releases before the shards kept a dialog's keys as `<prefix>:{d<id>}:…`, one flush
//!   stream `<prefix>:flush` and one quarantine index `<prefix>:quarantine`. Each key moves
//!   to its sharded name (`RENAMENX`: its value and expiry unchanged); each flush entry is
//!   queued again in its dialog's shard stream (an entry only names a dialog: one queued
//!   twice is flushed once, then dropped); the quarantine index is split by shard.
//!   Nothing staged is lost or changed. A start interrupted half-way moves the rest on
//!   the next start (the moves are idempotent; a marker is set only at the end).
//! - dapi's first release kept a granted dialog's keys without expiry: those get their
//!   `DAPI_STAGING_TTL`, from now (Guarantee 5), before they move.
//!
//! Older processes must be stopped first: they write the old names, which nothing of
//! this release reads after the move (docs/operations.md, "Upgrades"). A Redis Cluster needs none
//! of this: no older release ran on one.

use redis::AsyncCommands;

use super::keys::legacy;
use super::{Keyspace, RedisConn, Staging, StagingError};

/// Keys per `SCAN` page and per relocation script call.
const PAGE: usize = 1000;

/// What [`Staging::upgrade_layout`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Dialog keys renamed.
    pub dialog_keys: u64,
    /// Old-layout keys left in place because their new name existed.
    pub conflicts: u64,
    /// Flush entries queued again in their shard's stream.
    pub entries: u64,
    /// Dialogs given the expiry the first release left off.
    pub expired: u64,
}

impl Staging {
    /// Brings the keys of older releases up to this release's layout, once per process
    /// (and, by a marker, once per Redis). Staging and decisions wait for it; the
    /// processes that run flushers call it at start so that requests rarely do.
    pub async fn prepare(&self) -> Result<(), StagingError> {
        self.layout_ready().await
    }

    /// See the module doc. Returns what it moved.
    pub async fn upgrade_layout(&self) -> Result<Moved, StagingError> {
        if self.connector.is_cluster() {
            return Ok(Moved::default());
        }
        let mut conn = self.conn.clone();
        let marker = self.keys.layout_marker();
        let done: bool = self.bounded(conn.exists(&marker)).await?;
        if done {
            return Ok(Moved::default());
        }
        let mut moved = Moved::default();
        let prefix = self.keys.prefix().to_owned();
        // One walk for both fixes: `SCAN … MATCH` costs Redis ~0.5 µs for every key it
        // holds, whatever the pattern (2.2 s a walk with 4M keys of other programs), and
        // staging waits for this. The first release's expiry fix runs on each dialog a
        // page names before any of that page's keys move, so every dialog's keys are
        // still under their old names the first time it is met (meeting it again sets
        // nothing: its keys have their expiry).
        let expiry_marker = self.keys.expiry_sweep_marker();
        let expire: bool = !self.bounded(conn.exists(&expiry_marker)).await?;

        let pattern = legacy::dialog_pattern(&prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, found) = self.scan(&mut conn, cursor, &pattern).await?;
            let pairs: Vec<(String, String, i64)> = found
                .into_iter()
                .filter_map(|old| {
                    let (dialog, suffix) = legacy::parse(&prefix, &old)?;
                    let new = self.keys.dialog_key(dialog, suffix);
                    Some((old, new, dialog))
                })
                .collect();
            if expire {
                let mut dialogs: Vec<i64> = pairs.iter().map(|&(_, _, d)| d).collect();
                dialogs.sort_unstable();
                dialogs.dedup();
                moved.expired += self.expire_legacy(&mut conn, &prefix, &dialogs).await?;
            }
            if !pairs.is_empty() {
                let mut invocation = self.scripts.relocate.prepare_invoke();
                for (old, new, _) in &pairs {
                    invocation.key(old).key(new);
                }
                let (renamed, conflicts): (u64, u64) = self.bounded(invocation.invoke_async(&mut conn)).await?;
                moved.dialog_keys += renamed;
                moved.conflicts += conflicts;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }

        // The flush stream: every entry, pending or not, queued again in its shard.
        let stream = legacy::flush_stream(&prefix);
        let mut start = "-".to_owned();
        loop {
            let page: Vec<(String, Vec<(String, String)>)> = self
                .bounded(
                    redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async(&mut conn),
                )
                .await?;
            let Some((last, _)) = page.last() else { break };
            start = format!("({last}");
            let mut pipe = redis::pipe();
            for (_, fields) in &page {
                let dialog = fields
                    .iter()
                    .find(|(f, _)| f == "d")
                    .and_then(|(_, v)| v.parse::<i64>().ok());
                if let Some(dialog) = dialog {
                    pipe.cmd("XADD")
                        .arg(self.keys.flush_stream_of(dialog))
                        .arg("*")
                        .arg("d")
                        .arg(dialog)
                        .ignore();
                    moved.entries += 1;
                }
            }
            let () = self.bounded(pipe.query_async(&mut conn)).await?;
            if page.len() < PAGE {
                break;
            }
        }
        let _: i64 = self.bounded(conn.del(&stream)).await?;

        // The quarantine index, split by shard.
        let index = legacy::quarantine_index(&prefix);
        let entries: Vec<(i64, String)> = self.bounded(conn.hgetall(&index)).await?;
        if !entries.is_empty() {
            let mut pipe = redis::pipe();
            for (dialog, reason) in &entries {
                pipe.hset(self.keys.quarantine_index(Keyspace::shard_of(*dialog)), dialog, reason)
                    .ignore();
            }
            let () = self.bounded(pipe.query_async(&mut conn)).await?;
            let _: i64 = self.bounded(conn.del(&index)).await?;
        }

        if expire {
            let () = self.bounded(conn.set(&expiry_marker, 1)).await?;
        }
        let () = self.bounded(conn.set(&marker, 1)).await?;
        Ok(moved)
    }

    /// One `SCAN` step: the next cursor and up to about [`PAGE`] keys matching `pattern`.
    async fn scan(&self, conn: &mut RedisConn, cursor: u64, pattern: &str) -> Result<(u64, Vec<String>), StagingError> {
        self.bounded(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(conn),
        )
        .await
    }

    /// Gives every dialog's keys that dapi's first release left without expiry their
    /// `DAPI_STAGING_TTL`, from now (Guarantee 5: bounded staging); those keys have the
    /// layout of releases before the shards, and [`Staging::upgrade_layout`] does the same
    /// within its own walk, to each dialog before its keys move. This one walks the
    /// dialogs with `SCAN` (1000 at a time, one pipelined script call per dialog: each
    /// call stays within one dialog's keys), skips refusals
    /// awaiting their erasure and dialogs set aside, and then sets a marker so that later
    /// starts skip the walk. Safe to run from several processes at once. Returns how
    /// many dialogs it gave an expiry.
    pub async fn expire_keys_older_releases_kept(&self) -> Result<u64, StagingError> {
        if self.connector.is_cluster() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let marker = self.keys.expiry_sweep_marker();
        let done: bool = self.bounded(conn.exists(&marker)).await?;
        if done {
            return Ok(0);
        }
        let prefix = self.keys.prefix().to_owned();
        let pattern = legacy::meta_pattern(&prefix);
        let mut cursor: u64 = 0;
        let mut expired = 0;
        loop {
            let (next, metas) = self.scan(&mut conn, cursor, &pattern).await?;
            let dialogs: Vec<i64> = metas
                .iter()
                .filter_map(|key| match legacy::parse(&prefix, key)? {
                    (dialog, "meta") => Some(dialog),
                    _ => None,
                })
                .collect();
            expired += self.expire_legacy(&mut conn, &prefix, &dialogs).await?;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let () = self.bounded(conn.set(&marker, 1)).await?;
        Ok(expired)
    }

    /// The first release's expiry fix for `dialogs` under their old names: one script
    /// call per dialog, pipelined. Returns how many it gave an expiry.
    async fn expire_legacy(&self, conn: &mut RedisConn, prefix: &str, dialogs: &[i64]) -> Result<u64, StagingError> {
        if dialogs.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for &d in dialogs {
            let mut invocation = self.scripts.expire.prepare_invoke();
            invocation
                .key(legacy::dialog_key(prefix, d, "meta"))
                .key(legacy::dialog_key(prefix, d, "msgs"))
                .arg(self.ttl_ms);
            pipe.invoke_script(&invocation);
        }
        // Loaded first: a pipeline cannot load a script on NOSCRIPT half-way.
        let _: String = self.bounded(self.scripts.expire.load_async(conn)).await?;
        let set: Vec<u64> = self.bounded(pipe.query_async(conn)).await?;
        Ok(set.iter().sum())
    }
}
