//! Retention by partition (`DAPI_RETENTION`).
//!
//! `messages` is partitioned by the month (UTC) of `received_at` (migration 0004):
//! `messages_before` holds everything stored before partitioning, then one partition per
//! month, `messages_YYYYMM`. `message_partitions` lists them with their bounds, and every
//! count row carries the month of the messages it counts (`part`).
//!
//! The processes that run flushers keep the partitions ([`Store::maintain_partitions`],
//! at start and hourly, one process at a time under an advisory lock):
//!
//! - **ahead**: every month up to [`MONTHS_AHEAD`] after the current one has its
//!   partition, so a flush never meets a month without one (and if it does, with a
//!   clock far ahead, [`Store::apply`] creates it and writes again);
//! - **behind**: with a retention, a partition all of whose messages are older than
//!   `now - retention` is dropped, oldest first, in one transaction with the count rows
//!   of its months, so `count` stays exact without counting what is dropped. A message
//!   is therefore deleted between `retention` and `retention` + one month after it was
//!   received.
//!
//! A flush skips a message older than every partition (its month is past retention:
//! storing it would only keep it until the next pass).
//!
//! The audit trail (`consent_events`) is partitioned by month too (migration 0007,
//! listed in `audit_partitions`), its partitions made ahead by the same pass. With
//! `DAPI_AUDIT_RETENTION`, [`Store::drop_old_audit`] drops each of its partitions wholly
//! older than the horizon (never the newest) and deletes the completed receipts
//! (`erasures`) completed before it, 10,000 at a time; pending receipts stay.
//!
//! "Now" is a parameter, so tests move it instead of waiting months.

use std::time::Duration;

use time::{Date, Month, OffsetDateTime, Time};

use super::{Store, StoreError};

/// Months with a partition after the current one.
pub const MONTHS_AHEAD: u8 = 2;

/// Serialises partition maintenance across processes (`pg_advisory_xact_lock`).
const MAINTENANCE_LOCK: i64 = 0x6461_7069_5061_7274; // "dapiPart"

/// How long maintenance waits for the locks it needs (creating or dropping a partition
/// locks `messages` briefly) before it gives up until its next pass.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

/// What one [`Store::maintain_partitions`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintained {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    /// Monthly partitions of the audit trail created ahead.
    pub audit_created: Vec<String>,
}

/// A table partitioned by month, and the table that lists its partitions.
struct Partitioned {
    parent: &'static str,
    registry: &'static str,
}

/// `messages` (migration 0004).
const MESSAGES: Partitioned = Partitioned {
    parent: "messages",
    registry: "message_partitions",
};

/// The audit trail (migration 0007).
const AUDIT: Partitioned = Partitioned {
    parent: "consent_events",
    registry: "audit_partitions",
};

/// The first instant (UTC) of the month `at` falls in.
pub fn month_start(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.to_offset(time::UtcOffset::UTC);
    Date::from_calendar_date(at.year(), at.month(), 1)
        .unwrap_or(at.date())
        .with_time(Time::MIDNIGHT)
        .assume_utc()
}

/// The first instant of the month after the one starting at `start`.
fn next_month(start: OffsetDateTime) -> OffsetDateTime {
    let (year, month) = match start.month() {
        Month::December => (start.year() + 1, Month::January),
        m => (start.year(), m.next()),
    };
    Date::from_calendar_date(year, month, 1)
        .unwrap_or(start.date())
        .with_time(Time::MIDNIGHT)
        .assume_utc()
}

/// The name of `table`'s partition of the month starting at `low`.
fn partition_name(table: &Partitioned, low: OffsetDateTime) -> String {
    format!("{}_{:04}{:02}", table.parent, low.year(), u8::from(low.month()))
}

/// A timestamp as a SQL literal (DDL takes no parameters); made from numbers only.
fn literal(at: OffsetDateTime) -> String {
    format!(
        "'{:04}-{:02}-{:02} 00:00:00+00'",
        at.year(),
        u8::from(at.month()),
        at.day()
    )
}

impl Store {
    /// One maintenance pass as of `now`: partitions up to [`MONTHS_AHEAD`] months ahead,
    /// and with a `retention`, every partition past it dropped with its counts.
    pub async fn maintain_partitions(
        &self,
        now: OffsetDateTime,
        retention: Option<Duration>,
    ) -> Result<Maintained, StoreError> {
        let mut ahead = month_start(now);
        for _ in 0..MONTHS_AHEAD {
            ahead = next_month(ahead);
        }
        let mut done = Maintained {
            created: self.ensure_partitions_through(ahead).await?,
            dropped: Vec::new(),
            audit_created: self.ensure_audit_partitions_through(ahead).await?,
        };
        if let Some(retention) = retention {
            let horizon = now - retention;
            while let Some(name) = self.drop_oldest_partition_before(horizon).await? {
                done.dropped.push(name);
            }
        }
        Ok(done)
    }

    /// A transaction that holds the maintenance lock (one process at a time) and waits at
    /// most [`LOCK_TIMEOUT`] for any other lock.
    async fn maintenance_transaction(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MAINTENANCE_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(LOCK_TIMEOUT).execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Creates the monthly partitions of `messages` missing up to the one `at` falls in;
    /// returns their names.
    pub async fn ensure_partitions_through(&self, at: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        self.ensure_monthly_partitions(&MESSAGES, at).await
    }

    /// Creates the monthly partitions of `table` missing up to the one `at` falls in, each
    /// listed in its registry; returns their names.
    async fn ensure_monthly_partitions(
        &self,
        table: &Partitioned,
        at: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.maintenance_transaction().await?;
        // Our own words only, in every statement built here.
        let mut low: OffsetDateTime =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT max(high) FROM {}", table.registry)))
                .fetch_one(&mut *tx)
                .await?;
        let mut created = Vec::new();
        while low <= at {
            let high = next_month(low);
            let name = partition_name(table, low);
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE {name} PARTITION OF {} FOR VALUES FROM ({}) TO ({})",
                table.parent,
                literal(low),
                literal(high)
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (name, low, high) VALUES ($1, $2, $3)",
                table.registry
            )))
            .bind(&name)
            .bind(low)
            .bind(high)
            .execute(&mut *tx)
            .await?;
            created.push(name);
            low = high;
        }
        tx.commit().await?;
        Ok(created)
    }

    /// Drops the oldest partition if every message it can hold is older than `horizon`,
    /// with the count rows of its months, days and slots, in one transaction; returns its name. Never the
    /// last partition.
    async fn drop_oldest_partition_before(&self, horizon: OffsetDateTime) -> Result<Option<String>, StoreError> {
        let mut tx = self.maintenance_transaction().await?;
        let Some((name, high)) = oldest_listed_partition_before(&mut tx, &MESSAGES, horizon).await? else {
            return Ok(None);
        };
        // The parent first: dropping a partition locks it, and taking it before the
        // partition keeps the lock order of every other statement (parent, then
        // partitions). Flushes and reads wait for this short transaction.
        sqlx::query("LOCK TABLE ONLY messages IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        // Every count row of a month before `high` counts messages of this partition
        // (older partitions are gone already): their total is what the drop deletes, for
        // the audit trail's `retention` event.
        let rows: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(n), 0)::int8 FROM message_counts
             WHERE part < messages_month($1) AND customer_id = -1 AND language = ''",
        )
        .bind(high)
        .fetch_one(&mut *tx)
        .await?;
        super::erasure::write_events(
            &mut tx,
            &[super::erasure::Event {
                at: OffsetDateTime::now_utc(),
                event: "retention",
                customer: None,
                dialog: None,
                messages: Some(rows),
                erasure: None,
            }],
        )
        .await?;
        sqlx::query("DELETE FROM message_counts WHERE part < messages_month($1)")
            .bind(high)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM message_counts_fine
             WHERE (span = 600 AND bucket < messages_bucket($1, 600))
                OR (span = 86400 AND bucket < messages_bucket($1, 86400))",
        )
        .bind(high)
        .execute(&mut *tx)
        .await?;
        drop_listed_partition(&mut tx, &MESSAGES, &name).await?;
        tx.commit().await?;
        Ok(Some(name))
    }
}

/// The oldest partition of `table` (name, upper bound) if all it can hold is older than
/// `horizon`; never the last one.
async fn oldest_listed_partition_before(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &Partitioned,
    horizon: OffsetDateTime,
) -> Result<Option<(String, OffsetDateTime)>, StoreError> {
    // The registry's name is our own word.
    let oldest: Option<(String, OffsetDateTime)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT name, high FROM {0} WHERE (SELECT count(*) FROM {0}) > 1 ORDER BY high LIMIT 1",
        table.registry
    )))
    .fetch_optional(&mut **tx)
    .await?;
    Ok(oldest.filter(|(_, high)| *high <= horizon))
}

/// Drops partition `name` of `table` (the parent locked already) and its registry row.
async fn drop_listed_partition(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &Partitioned,
    name: &str,
) -> Result<(), StoreError> {
    // A name from the registry, quoted as an identifier; the registry's our own word.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE \"{}\"",
        name.replace('"', "\"\"")
    )))
    .execute(&mut **tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {} WHERE name = $1",
        table.registry
    )))
    .bind(name)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// The audit trail's monthly partitions (`consent_events`, migration 0007) up to the
    /// one `at` falls in; returns the names created. A month whose events already sit in
    /// the default partition (written under a clock far ahead) cannot get its own:
    /// PostgreSQL refuses, the maintenance pass fails and logs why, and the operator
    /// moves those events (they are never lost, and never dropped by retention).
    pub async fn ensure_audit_partitions_through(&self, at: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        self.ensure_monthly_partitions(&AUDIT, at).await
    }

    /// `DAPI_AUDIT_RETENTION`: drops every monthly partition of the audit trail wholly
    /// older than `horizon` (never the newest), and deletes completed receipts completed
    /// before it, a bounded batch at a time (pending receipts stay). Returns the
    /// partitions dropped and the receipts deleted.
    pub async fn drop_old_audit(&self, horizon: OffsetDateTime) -> Result<(Vec<String>, u64), StoreError> {
        let mut partitions = Vec::new();
        loop {
            let mut tx = self.maintenance_transaction().await?;
            let Some((name, _)) = oldest_listed_partition_before(&mut tx, &AUDIT, horizon).await? else {
                break;
            };
            sqlx::query("LOCK TABLE ONLY consent_events IN ACCESS EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
            drop_listed_partition(&mut tx, &AUDIT, &name).await?;
            tx.commit().await?;
            partitions.push(name);
        }
        let mut receipts = 0;
        loop {
            let done = sqlx::query(super::sql::DROP_OLD_RECEIPTS)
                .bind(horizon)
                .bind(10_000_i64)
                .execute(&self.pool)
                .await?
                .rows_affected();
            receipts += done;
            if done < 10_000 {
                break;
            }
        }
        Ok((partitions, receipts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn months_start_and_follow_in_utc() {
        assert_eq!(
            month_start(datetime!(2026-12-31 23:30 -02:00)),
            datetime!(2027-01-01 00:00 UTC)
        );
        assert_eq!(
            next_month(datetime!(2026-12-01 00:00 UTC)),
            datetime!(2027-01-01 00:00 UTC)
        );
        assert_eq!(
            partition_name(&MESSAGES, datetime!(2027-03-01 00:00 UTC)),
            "messages_202703"
        );
        assert_eq!(literal(datetime!(2027-03-01 00:00 UTC)), "'2027-03-01 00:00:00+00'");
    }
}
