//! The reads: GET /data's pages and cursors (with their exact counts), and the decisions
//! PostgreSQL holds of dialogs Redis does not know (the ingest path's lookup, the
//! flusher's settling).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;

use super::sql::{
    AFTER_ALL, AFTER_BY_CUSTOMER, AFTER_BY_CUSTOMER_LANGUAGE, AFTER_BY_LANGUAGE, DECIDED_DIALOGS, PAGE_ALL,
    PAGE_BY_CUSTOMER, PAGE_BY_CUSTOMER_LANGUAGE, PAGE_BY_LANGUAGE, STORED_MESSAGE_IDS,
};
use super::{Store, StoreError, lookup, micros_of, now_ms, sql, time_of};
use crate::domain::{Cursor, CustomerId, DialogId, GrantedDialog};

/// What PostgreSQL holds of a dialog Redis does not know (it forgot it, or never knew):
/// a grant, enough to bring it back in Redis, or a refusal, which keeps refusing its
/// messages for `DAPI_STAGING_TTL` after it was made, as Redis would have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldDialog {
    Granted(GrantedDialog),
    Refused {
        customer: CustomerId,
        decided_at: OffsetDateTime,
    },
}

/// What ingest's lookup learns of dialogs new to Redis: the decision PostgreSQL holds of
/// each, and which of the request's messageIds each granted one already stores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub dialogs: HashMap<DialogId, HeldDialog>,
    /// (dialog, messageId) → the seq PostgreSQL stores it under (Guarantee 8).
    pub message_ids: HashMap<(DialogId, String), i64>,
}

/// A consented message as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredMessage {
    pub customer_id: i64,
    pub dialog_id: i64,
    pub seq: i64,
    pub text: String,
    pub language: String,
    pub received_at: OffsetDateTime,
    /// The client's id for it (`None` when it gave none).
    pub message_id: Option<String>,
}

impl StoredMessage {
    /// The cursor that continues after this message.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            received_at_us: micros_of(self.received_at),
            dialog_id: self.dialog_id,
            seq: self.seq,
        }
    }
}

/// Which messages a read wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Matched case-insensitively.
    pub language: Option<String>,
    pub customer: Option<CustomerId>,
    /// Only messages received within this range (`receivedAfter`, `receivedBefore`).
    pub range: Range,
}

/// Exclusive bounds on `receivedAt`, in microseconds since the Unix epoch (PostgreSQL's
/// precision: an instant given finer is rounded outwards first, see
/// [`Range::from_instants`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub after_us: Option<i64>,
    pub before_us: Option<i64>,
}

/// Bounds for a statement that always takes both: before any message and after any.
pub(super) const EARLIEST: OffsetDateTime = time::macros::datetime!(0001-01-01 00:00:00 UTC);

pub(super) const LATEST: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999999 UTC);

impl Range {
    /// The range of messages received strictly after `after` and strictly before
    /// `before`, at microsecond precision without changing which messages it holds:
    /// `receivedAt > a` is `receivedAt > floor(a)` for a microsecond value, and
    /// `receivedAt < b` is `receivedAt < ceil(b)`.
    pub fn from_instants(after: Option<OffsetDateTime>, before: Option<OffsetDateTime>) -> Self {
        let floor = |at: OffsetDateTime| i64::try_from(at.unix_timestamp_nanos().div_euclid(1000)).ok();
        let ceil = |at: OffsetDateTime| i64::try_from((at.unix_timestamp_nanos() + 999).div_euclid(1000)).ok();
        Self {
            after_us: after.and_then(floor),
            before_us: before.and_then(ceil),
        }
    }

    pub fn is_whole(&self) -> bool {
        self.after_us.is_none() && self.before_us.is_none()
    }

    /// The lower bound as a timestamp to bind (the earliest one when none).
    pub(super) fn lower(&self) -> OffsetDateTime {
        self.after_us.map_or(EARLIEST, bound_time)
    }

    /// The upper bound as a timestamp to bind (the latest one when none).
    pub(super) fn upper(&self) -> OffsetDateTime {
        self.before_us.map_or(LATEST, bound_time)
    }
}

/// The times `pad_us` microseconds before and after `us`.
fn around(us: i64, pad_us: i64) -> (OffsetDateTime, OffsetDateTime) {
    (
        bound_time(us.saturating_sub(pad_us)),
        bound_time(us.saturating_add(pad_us)),
    )
}

/// Microseconds as a timestamp PostgreSQL holds: within years 1 … 9999.
pub(super) fn bound_time(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(if us < 0 { EARLIEST } else { LATEST })
        .clamp(EARLIEST, LATEST)
}

impl Filter {
    /// The page statement for this filter's form.
    fn page_statement(&self) -> &'static str {
        match (&self.language, self.customer, self.range.is_whole()) {
            (None, None, true) => PAGE_ALL,
            (Some(_), None, true) => PAGE_BY_LANGUAGE,
            (None, Some(_), true) => PAGE_BY_CUSTOMER,
            (Some(_), Some(_), true) => PAGE_BY_CUSTOMER_LANGUAGE,
            (None, None, false) => sql::PAGE_RANGE_ALL,
            (Some(_), None, false) => sql::PAGE_RANGE_BY_LANGUAGE,
            (None, Some(_), false) => sql::PAGE_RANGE_BY_CUSTOMER,
            (Some(_), Some(_), false) => sql::PAGE_RANGE_BY_CUSTOMER_LANGUAGE,
        }
    }

    /// The cursor statement for this filter's form.
    fn after_statement(&self) -> &'static str {
        match (&self.language, self.customer) {
            (None, None) => AFTER_ALL,
            (Some(_), None) => AFTER_BY_LANGUAGE,
            (None, Some(_)) => AFTER_BY_CUSTOMER,
            (Some(_), Some(_)) => AFTER_BY_CUSTOMER_LANGUAGE,
        }
    }
}

/// Every dialog among `dialogs` that PostgreSQL holds a decision of.
pub(super) async fn decided_dialogs_in(
    pool: &PgPool,
    dialogs: &[DialogId],
) -> Result<HashMap<DialogId, HeldDialog>, StoreError> {
    let ids: Vec<i64> = dialogs.iter().map(|d| d.get()).collect();
    // Planned on each call (not kept as a prepared statement): a plan kept from when
    // `dialogs` was small would scan it whole once it is large.
    let rows: Vec<DecidedRow> = sqlx::query_as(DECIDED_DIALOGS)
        .persistent(false)
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let customer = CustomerId::from_stored(r.customer_id);
            let held = if r.refused {
                HeldDialog::Refused {
                    customer,
                    decided_at: r.decided_at,
                }
            } else {
                HeldDialog::Granted(GrantedDialog {
                    customer,
                    last_seq: r.last_seq,
                })
            };
            (DialogId::from_stored(r.dialog_id), held)
        })
        .collect())
}

/// Of the (dialog, messageId) pairs asked, those `messages` holds, with the lowest seq
/// stored under each. Planned on each call (a pair is a key lookup).
pub(super) async fn stored_message_ids_in<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    pairs: &[(i64, &str)],
) -> Result<HashMap<(i64, String), i64>, StoreError> {
    if pairs.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(STORED_MESSAGE_IDS)
        .persistent(false)
        .bind(pairs.iter().map(|p| p.0).collect::<Vec<_>>())
        .bind(pairs.iter().map(|p| p.1).collect::<Vec<_>>())
        .fetch_all(executor)
        .await?;
    Ok(rows.into_iter().map(|(d, m, seq)| ((d, m), seq)).collect())
}

/// What PostgreSQL holds of `dialogs` and, for those it holds as granted, of the
/// messageIds asked (`message_ids`): ingest's lookup.
pub(super) async fn known_in(
    pool: &PgPool,
    dialogs: &[DialogId],
    message_ids: &[(DialogId, String)],
) -> Result<Known, StoreError> {
    let dialogs = decided_dialogs_in(pool, dialogs).await?;
    // Only a granted dialog with messages stored can hold a messageId.
    let pairs: Vec<(i64, &str)> = message_ids
        .iter()
        .filter(|(d, _)| matches!(dialogs.get(d), Some(HeldDialog::Granted(g)) if g.last_seq > 0))
        .map(|(d, m)| (d.get(), m.as_str()))
        .collect();
    let message_ids = stored_message_ids_in(pool, &pairs)
        .await?
        .into_iter()
        .map(|((d, m), seq)| ((DialogId::from_stored(d), m), seq))
        .collect();
    Ok(Known { dialogs, message_ids })
}

/// The granted dialogs among `dialogs`, with their customer and highest stored seq.
pub(super) async fn granted_dialogs_in(
    pool: &PgPool,
    dialogs: &[DialogId],
) -> Result<HashMap<DialogId, GrantedDialog>, StoreError> {
    Ok(decided_dialogs_in(pool, dialogs)
        .await?
        .into_iter()
        .filter_map(|(dialog, held)| match held {
            HeldDialog::Granted(granted) => Some((dialog, granted)),
            HeldDialog::Refused { .. } => None,
        })
        .collect())
}

/// How long [`Store::decided_dialogs_quickly`] waits for PostgreSQL.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How long it stops asking after a failure.
const PROBE_BACKOFF: Duration = Duration::from_secs(1);

/// A row of a page statement: the count, and a message unless the page is empty.
#[derive(sqlx::FromRow)]
struct PageRow {
    count: i64,
    customer_id: Option<i64>,
    dialog_id: Option<i64>,
    seq: Option<i64>,
    text: Option<String>,
    language: Option<String>,
    received_at: Option<OffsetDateTime>,
    message_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct DecidedRow {
    dialog_id: i64,
    customer_id: i64,
    last_seq: i64,
    refused: bool,
    decided_at: OffsetDateTime,
}

impl Store {
    /// Of `dialogs`, every one PostgreSQL holds a decision of: a grant with its customer
    /// and last stored seq, or a refusal with its customer and time. Used when Redis has
    /// forgotten dialogs that a request names, and to settle unverified ones.
    pub async fn decided_dialogs(&self, dialogs: &[DialogId]) -> Result<HashMap<DialogId, HeldDialog>, StoreError> {
        decided_dialogs_in(&self.pool, dialogs).await
    }

    /// [`Store::decided_dialogs`] for one dialog.
    pub async fn decided_dialog(&self, dialog: DialogId) -> Result<Option<HeldDialog>, StoreError> {
        Ok(self.decided_dialogs(&[dialog]).await?.remove(&dialog))
    }

    /// Of `dialogs`, those PostgreSQL holds as granted, with their customer and last
    /// stored seq. Used when Redis has forgotten dialogs that a request names.
    pub async fn granted_dialogs(&self, dialogs: &[DialogId]) -> Result<HashMap<DialogId, GrantedDialog>, StoreError> {
        granted_dialogs_in(&self.pool, dialogs).await
    }

    /// [`Store::granted_dialogs`] for one dialog.
    pub async fn granted_dialog(&self, dialog: DialogId) -> Result<Option<GrantedDialog>, StoreError> {
        Ok(self.granted_dialogs(&[dialog]).await?.remove(&dialog))
    }

    /// What PostgreSQL holds of `dialogs` (new to Redis) and which of `message_ids` they
    /// store already, for the ingest path, which must never wait on PostgreSQL: at most
    /// [`PROBE_TIMEOUT`], and after a failure not asked at all for [`PROBE_BACKOFF`].
    /// `Err` means "could not find out".
    pub async fn decided_dialogs_quickly(
        &self,
        dialogs: &[DialogId],
        message_ids: &[(DialogId, String)],
    ) -> Result<Known, StoreError> {
        if now_ms() < self.probe_closed_until_ms.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        }
        // The lookup task runs the query (so that it is never dropped half-way on its
        // connection), together with other requests' lookups.
        let lookups = self.lookups.get_or_init(|| lookup::Lookups::start(self.pool.clone()));
        let result =
            match tokio::time::timeout(PROBE_TIMEOUT, lookups.decided(dialogs.to_vec(), message_ids.to_vec())).await {
                Ok(Some(found)) => Ok(found),
                Ok(None) | Err(_) => Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
            };
        if result.is_err() {
            let until = now_ms().saturating_add(u64::try_from(PROBE_BACKOFF.as_millis()).unwrap_or(u64::MAX));
            self.probe_closed_until_ms.store(until, Ordering::Relaxed);
        }
        result
    }

    /// One page in newest-first order and the exact number of matching messages, read
    /// in one statement (one snapshot).
    pub async fn page(
        &self,
        filter: &Filter,
        offset: i64,
        limit: i64,
    ) -> Result<(i64, Vec<StoredMessage>), StoreError> {
        // Reads are planned on each call, for the same reason as the erasure: a plan kept
        // from a small table would sort a whole large one.
        let mut query = sqlx::query_as(filter.page_statement())
            .persistent(false)
            .bind(limit)
            .bind(offset)
            .bind(filter.language.as_deref())
            .bind(filter.customer.map(CustomerId::get));
        if !filter.range.is_whole() {
            let [lo, hi] =
                [filter.range.after_us, filter.range.before_us].map(|end| end.map(|us| around(us, 600_000_000)));
            query = query
                .bind(filter.range.after_us.map(bound_time))
                .bind(filter.range.before_us.map(bound_time))
                .bind(lo.map(|w| w.0))
                .bind(lo.map(|w| w.1))
                .bind(hi.map(|w| w.0))
                .bind(hi.map(|w| w.1));
        }
        let rows: Vec<PageRow> = query.fetch_all(self.reads()).await.map_err(|e| self.read_error(e))?;
        let count = rows.first().map_or(0, |r| r.count);
        // Past the last page the count's row comes alone, its message columns NULL.
        let messages = rows
            .into_iter()
            .filter_map(|r| {
                Some(StoredMessage {
                    customer_id: r.customer_id?,
                    dialog_id: r.dialog_id?,
                    seq: r.seq?,
                    text: r.text?,
                    language: r.language?,
                    received_at: r.received_at?,
                    message_id: r.message_id,
                })
            })
            .collect();
        Ok((count, messages))
    }

    /// Up to `limit` messages after `cursor` (from the newest when `None`) in
    /// newest-first order: a keyset step whose cost does not grow with depth.
    pub async fn after(
        &self,
        filter: &Filter,
        cursor: Option<Cursor>,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let (at, dialog, seq) = match cursor {
            Some(c) => (time_of(c.received_at_us), c.dialog_id, c.seq),
            None => (time::macros::datetime!(9999-12-31 23:59:59 UTC), i64::MAX, i64::MAX),
        };
        // `receivedBefore` is a position to start after: (before, -1, -1) precedes every
        // message received at `before` (ids are not negative) and follows every earlier one.
        let (at, dialog, seq) = match filter.range.before_us.map(bound_time) {
            Some(before) if at >= before => (before, -1, -1),
            _ => (at, dialog, seq),
        };
        let mut query = sqlx::query_as(filter.after_statement())
            .persistent(false)
            .bind(limit)
            .bind(at)
            .bind(dialog)
            .bind(seq);
        if let Some(language) = &filter.language {
            query = query.bind(language);
        }
        if let Some(customer) = filter.customer {
            query = query.bind(customer.get());
        }
        query
            .bind(filter.range.lower())
            .fetch_all(self.reads())
            .await
            .map_err(|e| self.read_error(e))
    }

    /// A read's error. On a replica, a missing database or table (3D000, 42P01) means it
    /// has not replayed the primary's creation or migration yet, and a query cancelled by
    /// a conflict with recovery (40001, 40P01) is the standby's doing: unavailable for now
    /// (503), not a bug.
    pub(super) fn read_error(&self, e: sqlx::Error) -> StoreError {
        let lagging = self.replica.is_some()
            && matches!(&e, sqlx::Error::Database(db)
                if db.code().is_some_and(|c| matches!(c.as_ref(), "3D000" | "42P01" | "40001" | "40P01")));
        if lagging { StoreError::Unavailable(e) } else { e.into() }
    }

    /// The pool reads go to: the replica when there is one.
    pub(super) fn reads(&self) -> &PgPool {
        self.replica.as_ref().unwrap_or(&self.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_forms_pick_distinct_statements() {
        let lang = Some("en".to_owned());
        let cust = Some(CustomerId::from_stored(1));
        let filters = [
            Filter::default(),
            Filter {
                language: lang.clone(),
                ..Filter::default()
            },
            Filter {
                customer: cust,
                ..Filter::default()
            },
            Filter {
                language: lang,
                customer: cust,
                ..Filter::default()
            },
        ];
        let pages: std::collections::HashSet<_> = filters.iter().map(Filter::page_statement).collect();
        let afters: std::collections::HashSet<_> = filters.iter().map(Filter::after_statement).collect();
        assert_eq!((pages.len(), afters.len()), (4, 4));
        assert!(filters[3].after_statement().contains("customer_id = $6"));
        let ranged: std::collections::HashSet<_> = filters
            .iter()
            .map(|f| {
                Filter {
                    range: Range {
                        after_us: Some(0),
                        before_us: None,
                    },
                    ..f.clone()
                }
                .page_statement()
            })
            .collect();
        assert_eq!(ranged.len(), 4);
        assert!(ranged.is_disjoint(&pages));
    }

    #[test]
    fn ranges_round_outwards_to_microseconds() {
        let at = time::macros::datetime!(2026-01-01 00:00:00.000001500 UTC);
        let range = Range::from_instants(Some(at), Some(at));
        assert_eq!(range.after_us, Some(micros_of(at)));
        assert_eq!(range.before_us, Some(micros_of(at) + 1));
        let exact = time::macros::datetime!(2026-01-01 00:00:00.000002 UTC);
        let range = Range::from_instants(Some(exact), Some(exact));
        assert_eq!(
            (range.after_us, range.before_us),
            (Some(micros_of(exact)), Some(micros_of(exact)))
        );
    }
}
