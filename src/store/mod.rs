//! The consented store in PostgreSQL: embedded migrations, the batch write that the
//! flusher and the refusal handler share, the reads behind GET /data, and exact counts.
//!
//! # The epoch fence
//!
//! [`Store::apply`] writes dialog states in one transaction. For every dialog it first
//! upserts the `dialogs` row, changing it only where the stored epoch is not newer than
//! the one being written; that statement locks the row. Messages of a granted dialog are
//! inserted only when that upsert took. A refusal and a flush of the same dialog
//! therefore serialise on the row lock, and whichever commits last, the decision with the
//! newer epoch is what holds: a stale flush can never bring back what a refusal erased.
//!
//! # Erasure
//!
//! A refusal erases the dialog, not a range of it: when a refusal's upsert takes, every
//! stored message of the dialog is deleted in the same transaction, whatever its seq and
//! however it got there (an earlier incarnation of the dialog, a flush that raced it).
//! When the upsert does not take, nothing is deleted: PostgreSQL already holds a newer
//! decision, which either erased the dialog itself or belongs to a later incarnation
//! whose rows are not this refusal's to touch. A state that carries an unconfirmed
//! refusal (a grant that followed a refusal whose own erasure never reached PostgreSQL)
//! is written as two steps in one transaction: that refusal first, then the grant.
//!
//! Every statement here is planned for an index whatever the planner's mode, in its
//! generic plan too, and the ones that look rows up are planned on each call
//! (`.persistent(false)`), the erasure with sequential scans off: why, and the tests that
//! keep it so, in [`sql`]'s module documentation ("Plans").
//!
//! # Counts
//!
//! `message_counts` holds exact counts per (customer, language), per customer, per
//! language and in total (`-1` / `''` mean "any"), maintained by the same statements that
//! insert and delete messages, from the rows they actually inserted or deleted. Each
//! transaction adds into one of 16 shards of every counter it touches, so concurrent
//! flushes and erasures do not queue on one hot row; a count sums its shards. A page
//! answer reads its count and its rows in one statement, so both come from one snapshot.
//!
//! # Order
//!
//! Readers see newest first: `received_at DESC, dialog_id DESC, seq DESC`, served by
//! scanning the `(…, received_at, dialog_id, seq)` indexes backwards.
//!
//! # Partitions and the last seq
//!
//! `messages` is partitioned by month of `received_at`, and old months are dropped whole
//! with their count rows (each count row carries its month): see [`retention`]. Every
//! per-dialog statement therefore probes each partition's primary key; the one asked on
//! the ingest path, the revival lookup, reads `dialogs.last_seq` instead (kept by the
//! grant's upsert, reset by a refusal). Connections run with `jit = off`: no statement
//! here is large enough for JIT to pay, and a plan that crossed `jit_above_cost` was once
//! compiled on every flush.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use time::OffsetDateTime;

pub use crate::domain::GrantedDialog;
use crate::domain::{Cursor, CustomerId, Decision, DialogId, DialogState, Refusal, TakeBack};

pub mod erasure;
pub mod export;
mod lookup;
pub mod retention;
pub mod sql;

use sql::{
    AFTER_ALL, AFTER_BY_CUSTOMER, AFTER_BY_CUSTOMER_LANGUAGE, AFTER_BY_LANGUAGE, DECIDED_DIALOGS,
    ERASE_DIALOGS_AUDITED, INSERT_MESSAGES, NEWER_DECISIONS, PAGE_ALL, PAGE_BY_CUSTOMER, PAGE_BY_CUSTOMER_LANGUAGE,
    PAGE_BY_LANGUAGE, PING, PRIOR_DECISIONS, RAISE_LAST_SEQ, STORED_MESSAGE_IDS, UPSERT_DIALOGS,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("PostgreSQL is unreachable")]
    Unavailable(#[source] sqlx::Error),
    #[error("PostgreSQL query failed")]
    Query(#[source] sqlx::Error),
    #[error("migrating the database failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the task writing to PostgreSQL failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the read replica has not replayed the primary's latest writes in time")]
    ReplicaBehind,
    #[error("the customer's erasure is under way: it erases this dialog, and the refusal waits for it")]
    ErasureUnderWay,
    #[error("the flush could not claim its dialogs in Redis before its commit")]
    Claim(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let unavailable = match &e {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => true,
            // Connection exceptions (08…), shutdown and start-up states (57P01–57P03),
            // too many connections (53300), a read-only server after a failover (25006),
            // a statement cancelled by a timeout or an operator (57014).
            E::Database(db) => db.code().is_some_and(|code| {
                code.starts_with("08")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300" | "25006" | "57014")
            }),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(e)
        } else {
            StoreError::Query(e)
        }
    }
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// A message fell in a month without a partition (a clock far ahead of maintenance).
    fn is_missing_partition(&self) -> bool {
        matches!(self, StoreError::Query(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("23514") && db.message().starts_with("no partition of relation"))
    }

    /// A deadlock or serialisation failure: the transaction may simply be run again.
    fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Query(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c == "40P01" || c == "40001"))
    }
}

/// What [`Store::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Messages newly inserted (not counting ones already stored).
    pub inserted: u64,
    /// Messages deleted by refusals.
    pub erased: u64,
    /// Dialogs whose state was not written because PostgreSQL holds a newer decision.
    pub fenced: u64,
    /// Granted dialogs whose upsert took: their messages are in PostgreSQL now, and only
    /// theirs may be trimmed from Redis.
    pub granted: BTreeSet<i64>,
    /// Granted dialogs fenced by a newer decision PostgreSQL holds, and that decision:
    /// Redis lost it (a failover, a restore) and must take it back, or the dialog would
    /// be flushed and fenced for ever.
    pub newer_in_store: BTreeMap<i64, TakeBack>,
    /// Granted dialogs whose messages were written under seqs the claim reserved (Redis
    /// had started a new life of the dialog since the snapshot): none of the batch's
    /// messages is in that life's list, so nothing is trimmed.
    pub renumbered: BTreeSet<i64>,
    /// Dialogs not written because their customer's erasure is pending: the erasure
    /// writes them. Nothing of them may be trimmed or confirmed.
    pub deferred: BTreeSet<i64>,
}

/// A granted dialog a flush is about to write, as [`Store::apply_claiming`] names it to
/// its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claiming {
    pub dialog: i64,
    pub customer: CustomerId,
    pub epoch: i64,
    /// The highest seq the batch writes of it, and how many messages.
    pub last_seq: i64,
    pub count: usize,
}

/// The claim [`Store::apply_claiming`] calls: dialog → the seq after which its messages
/// are renumbered, for the dialogs that must be.
pub type ClaimFn<'a> = dyn Fn(
        Vec<Claiming>,
    ) -> futures_util::future::BoxFuture<'a, Result<HashMap<i64, i64>, Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Sync
    + 'a;

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
const EARLIEST: OffsetDateTime = time::macros::datetime!(0001-01-01 00:00:00 UTC);
const LATEST: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999999 UTC);

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
    fn lower(&self) -> OffsetDateTime {
        self.after_us.map_or(EARLIEST, bound_time)
    }

    /// The upper bound as a timestamp to bind (the latest one when none).
    fn upper(&self) -> OffsetDateTime {
        self.before_us.map_or(LATEST, bound_time)
    }
}

/// Microseconds as a timestamp PostgreSQL holds: within years 1 … 9999.
fn bound_time(us: i64) -> OffsetDateTime {
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

/// A pool that connects when first used and gives up on a connection after a few seconds.
fn lazy_pool(url: &str) -> Result<PgPool, StoreError> {
    // No JIT: every statement here is small, and a plan whose cost crosses
    // `jit_above_cost` (any plan with a node disabled by `enable_seqscan = off`, which the
    // erasure's transaction sets) was compiled on every execution: ~1 s per flush batch
    // (measured, BENCHMARKS.md). `tests/api/plans.rs` also checks no plan needs one.
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()
        .map_err(StoreError::Query)?
        .options([("jit", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(options))
}

/// Every dialog among `dialogs` that PostgreSQL holds a decision of.
async fn decided_dialogs_in(pool: &PgPool, dialogs: &[DialogId]) -> Result<HashMap<DialogId, HeldDialog>, StoreError> {
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
async fn stored_message_ids_in<'e, E: sqlx::PgExecutor<'e>>(
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
async fn known_in(
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

/// What PostgreSQL holds of a dialog before a transaction writes it.
#[derive(Debug, Clone, Copy)]
struct Prior {
    refused: bool,
    epoch: i64,
    decided_at_us: i64,
    last_seq: i64,
}

/// The decisions PostgreSQL holds of the dialogs `states` write, read (and locked) first,
/// and the customers among theirs whose erasure is pending (`PRIOR_DECISIONS`).
async fn prior_decisions(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    states: &[&DialogState],
) -> Result<(HashMap<i64, Prior>, BTreeSet<i64>), StoreError> {
    let mut customers: Vec<i64> = states.iter().map(|s| s.customer.get()).collect();
    customers.sort_unstable();
    customers.dedup();
    let rows: Vec<(i64, bool, i64, OffsetDateTime, i64, bool)> = sqlx::query_as(PRIOR_DECISIONS)
        .persistent(false)
        .bind(states.iter().map(|s| s.dialog.get()).collect::<Vec<_>>())
        .bind(customers)
        .fetch_all(&mut **tx)
        .await?;
    let mut prior = HashMap::new();
    let mut erasing = BTreeSet::new();
    for (id, refused, epoch, at, last_seq, is_erasing) in rows {
        if is_erasing {
            erasing.insert(id);
        } else {
            let decided_at_us = micros_of(at);
            prior.insert(
                id,
                Prior {
                    refused,
                    epoch,
                    decided_at_us,
                    last_seq,
                },
            );
        }
    }
    Ok((prior, erasing))
}

/// The event of a grant that no transaction has written yet, if `state` carries one newer
/// than what PostgreSQL held (`prior`).
fn grant_event(state: &DialogState, prior: Option<&Prior>) -> Option<erasure::Event> {
    let grant = state.audit.unwritten_grant?;
    (prior.is_none_or(|p| p.epoch < grant.epoch)).then(|| erasure::Event {
        at: time_of(grant.decided_at_us),
        event: "granted",
        customer: Some(state.customer.get()),
        dialog: Some(state.dialog.get()),
        messages: None,
        erasure: None,
    })
}

/// Step 1: refusals not yet applied, each erasing its whole dialog if it takes, with
/// their audit events (a grant one overtook first, then the refusal's own, unless
/// PostgreSQL held a refusal already), written by the erasing statement itself.
async fn apply_refusals(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    states: &[&DialogState],
    shard: i16,
    prior: &mut HashMap<i64, Prior>,
    applied: &mut Applied,
) -> Result<(), StoreError> {
    let refusals: Vec<(&DialogState, Refusal)> = states
        .iter()
        .filter_map(|s| s.unerased_refusal.map(|r| (*s, r)))
        .collect();
    if refusals.is_empty() {
        return Ok(());
    }
    let took: Vec<i64> = sqlx::query_scalar(UPSERT_DIALOGS)
        .bind(refusals.iter().map(|(s, _)| s.dialog.get()).collect::<Vec<_>>())
        .bind(refusals.iter().map(|(s, _)| s.customer.get()).collect::<Vec<_>>())
        .bind(vec![Decision::Refused.as_str(); refusals.len()])
        .bind(refusals.iter().map(|(_, r)| r.epoch).collect::<Vec<_>>())
        .bind(
            refusals
                .iter()
                .map(|(_, r)| time_of(r.decided_at_us))
                .collect::<Vec<_>>(),
        )
        .bind(vec![0_i64; refusals.len()])
        .fetch_all(&mut **tx)
        .await?;
    applied.fenced += (refusals.len() - took.len()) as u64;
    if took.is_empty() {
        return Ok(());
    }
    let mut events = Vec::new();
    let mut staged: (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
    for (state, refusal) in refusals.iter().filter(|(s, _)| took.contains(&s.dialog.get())) {
        let dialog = state.dialog.get();
        let before = prior.get(&dialog).copied();
        let grant = grant_event(state, before.as_ref());
        let customer = (state.customer.get() >= 0).then(|| state.customer.get());
        if before.is_none_or(|p| !p.refused) || grant.is_some() {
            for &seq in &state.audit.erased_staged {
                staged.0.push(dialog);
                staged.1.push(seq);
            }
            events.extend(grant);
            events.push(erasure::Event {
                at: time_of(refusal.decided_at_us),
                event: "refused",
                customer,
                dialog: Some(dialog),
                messages: None,
                erasure: None,
            });
        }
        prior.insert(
            dialog,
            Prior {
                refused: true,
                epoch: refusal.epoch,
                decided_at_us: refusal.decided_at_us,
                last_seq: 0,
            },
        );
    }
    // Never a sequential scan of `messages`, whatever the statistics: the transaction
    // began with `BEGIN_ERASING` (see `ERASE_DIALOGS_ROWS`, whose erasure this is, plus the audit).
    let erased: i64 = sqlx::query_scalar(ERASE_DIALOGS_AUDITED)
        .persistent(false)
        .bind(&took)
        .bind(shard)
        .bind(staged.0)
        .bind(staged.1)
        .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.event).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.customer).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.dialog).collect::<Vec<_>>())
        .fetch_one(&mut **tx)
        .await?;
    applied.erased = erased.unsigned_abs();
    Ok(())
}

/// Step 2: grants, and their messages where the grant took (see [`Store::apply_claiming`]
/// for the claim), with a grant's audit event when this is the transaction that first
/// writes it.
async fn apply_grants(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    states: &[&DialogState],
    shard: i16,
    claim: &ClaimFn<'_>,
    prior: &HashMap<i64, Prior>,
    applied: &mut Applied,
    events: &mut Vec<erasure::Event>,
) -> Result<(), StoreError> {
    let grants: Vec<&DialogState> = states
        .iter()
        .copied()
        .filter(|s| s.decision == Decision::Granted)
        .collect();
    if grants.is_empty() {
        return Ok(());
    }
    let took: Vec<i64> = sqlx::query_scalar(UPSERT_DIALOGS)
        .bind(grants.iter().map(|s| s.dialog.get()).collect::<Vec<_>>())
        .bind(grants.iter().map(|s| s.customer.get()).collect::<Vec<_>>())
        .bind(vec![Decision::Granted.as_str(); grants.len()])
        .bind(grants.iter().map(|s| s.epoch).collect::<Vec<_>>())
        .bind(grants.iter().map(|s| time_of(s.decided_at_us)).collect::<Vec<_>>())
        // The highest seq this batch writes (a message it skips below only leaves a gap:
        // the dialog's next seq is higher, never reused).
        .bind(
            grants
                .iter()
                .map(|s| s.messages.iter().map(|m| m.seq).max().unwrap_or(0))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut **tx)
        .await?;
    applied.fenced += (grants.len() - took.len()) as u64;
    applied.granted = took.into_iter().collect();
    let fenced: Vec<i64> = grants
        .iter()
        .map(|s| s.dialog.get())
        .filter(|d| !applied.granted.contains(d))
        .collect();
    if !fenced.is_empty() {
        applied.newer_in_store = newer_decisions(tx, &fenced).await?;
    }
    let written: Vec<&DialogState> = grants
        .into_iter()
        .filter(|s| applied.granted.contains(&s.dialog.get()))
        .collect();
    events.extend(
        written
            .iter()
            .filter_map(|s| grant_event(s, prior.get(&s.dialog.get()))),
    );
    let count = written.iter().map(|s| s.messages.len()).sum();
    if count == 0 {
        return Ok(());
    }
    let renumbered = renumber_claimed(tx, &written, claim).await?;
    applied.renumbered = renumbered.iter().map(|s| s.dialog.get()).collect();
    let written: Vec<&DialogState> = written
        .into_iter()
        .map(|s| renumbered.iter().find(|r| r.dialog == s.dialog).unwrap_or(s))
        .collect();
    let copies = copies_of_stored_ids(tx, &written, prior).await?;
    let mut cols = MessageColumns::with_capacity(count);
    for s in &written {
        // A message received before its dialog's refusal was erased by it and must never
        // come back, even when Redis still holds it (a failover lost the refusal there)
        // and a later grant takes.
        let erased_before = prior
            .get(&s.dialog.get())
            .filter(|p| p.refused)
            .map_or(i64::MIN, |p| p.decided_at_us);
        for m in s
            .messages
            .iter()
            .filter(|m| m.received_at_us > erased_before)
            .filter(|m| !copies.contains(&(s.dialog.get(), m.seq)))
        {
            cols.dialog_id.push(s.dialog.get());
            cols.seq.push(m.seq);
            cols.customer_id.push(s.customer.get());
            cols.language.push(&m.language);
            cols.text.push(&m.text);
            cols.received_at.push(time_of(m.received_at_us));
            cols.message_id.push(m.message_id.as_deref());
        }
    }
    let inserted: i64 = sqlx::query_scalar(INSERT_MESSAGES)
        .bind(cols.dialog_id)
        .bind(cols.seq)
        .bind(cols.customer_id)
        .bind(cols.language)
        .bind(cols.text)
        .bind(cols.received_at)
        .bind(cols.message_id)
        .bind(shard)
        .fetch_one(&mut **tx)
        .await?;
    applied.inserted = inserted.unsigned_abs();
    Ok(())
}

/// The newer decision PostgreSQL holds of each of `fenced` (grants the fence turned
/// away), for Redis to take back.
async fn newer_decisions(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    fenced: &[i64],
) -> Result<BTreeMap<i64, TakeBack>, StoreError> {
    let newer: Vec<(i64, bool, i64, Option<OffsetDateTime>)> = sqlx::query_as(NEWER_DECISIONS)
        .persistent(false)
        .bind(fenced)
        .fetch_all(&mut **tx)
        .await?;
    Ok(newer
        .into_iter()
        .map(|(dialog, refused, epoch, erased_at)| {
            let take_back = if refused {
                TakeBack::Refusal { epoch }
            } else {
                TakeBack::Grant {
                    epoch,
                    erased_before_us: erased_at.map_or(0, micros_of),
                }
            };
            (dialog, take_back)
        })
        .collect())
}

/// Claims `written` in Redis (inside the transaction, rows locked) and renumbers the
/// messages of the dialogs the claim says must take seqs of their own, raising their
/// `last_seq`. Returns the renumbered states.
async fn renumber_claimed(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    written: &[&DialogState],
    claim: &ClaimFn<'_>,
) -> Result<Vec<DialogState>, StoreError> {
    let claims = written
        .iter()
        .filter_map(|s| {
            Some(Claiming {
                dialog: s.dialog.get(),
                customer: s.customer,
                epoch: s.epoch,
                last_seq: s.messages.last()?.seq,
                count: s.messages.len(),
            })
        })
        .collect();
    let renumbered = claim(claims).await.map_err(StoreError::Claim)?;
    let renumbered: Vec<DialogState> = written
        .iter()
        .filter_map(|s| {
            let after = *renumbered.get(&s.dialog.get())?;
            let mut s = (*s).clone();
            for (m, seq) in s.messages.iter_mut().zip(after + 1..) {
                m.seq = seq;
            }
            Some(s)
        })
        .collect();
    if !renumbered.is_empty() {
        sqlx::query(RAISE_LAST_SEQ)
            .bind(renumbered.iter().map(|s| s.dialog.get()).collect::<Vec<_>>())
            .bind(
                renumbered
                    .iter()
                    .map(|s| s.messages.last().map_or(0, |m| m.seq))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut **tx)
            .await?;
    }
    Ok(renumbered)
}

/// The messages of `written` (grants whose upsert took, their rows locked) that are
/// copies of a messageId the dialog stores already under another seq, or carries twice in
/// this batch: (dialog, seq) of each copy, never to be inserted (Guarantee 8). A copy is
/// a retry nothing could recognise when it came (Redis had lost the dialog and PostgreSQL
/// could not be asked, or the messageId had left Redis's window); the lowest seq wins.
async fn copies_of_stored_ids(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    written: &[&DialogState],
    prior: &HashMap<i64, Prior>,
) -> Result<BTreeSet<(i64, i64)>, StoreError> {
    let mut first: HashMap<(i64, &str), i64> = HashMap::new();
    let mut copies = BTreeSet::new();
    // Only a dialog PostgreSQL holds as granted with messages stored can hold a copy's
    // original: a first flush (no row) or one after a refusal (erased) asks nothing.
    let may_hold = |dialog: i64| prior.get(&dialog).is_some_and(|p| !p.refused && p.last_seq > 0);
    let mut asked: Vec<(i64, &str)> = Vec::new();
    for s in written {
        for m in &s.messages {
            let Some(id) = m.message_id.as_deref() else { continue };
            match first.entry((s.dialog.get(), id)) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(m.seq);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let (keep, drop) = (m.seq.min(*o.get()), m.seq.max(*o.get()));
                    o.insert(keep);
                    copies.insert((s.dialog.get(), drop));
                }
            }
        }
    }
    asked.extend(first.keys().copied().filter(|(dialog, _)| may_hold(*dialog)));
    if asked.is_empty() {
        return Ok(copies);
    }
    for ((dialog, id), stored) in stored_message_ids_in(&mut **tx, &asked).await? {
        if let Some(&seq) = first.get(&(dialog, id.as_str()))
            && seq != stored
        {
            copies.insert((dialog, seq));
        }
    }
    Ok(copies)
}

/// The granted dialogs among `dialogs`, with their customer and highest stored seq.
async fn granted_dialogs_in(
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

/// The one handle on PostgreSQL.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Where reads go when they do not go to `pool`: a streaming replica
    /// (`DATABASE_READ_URL`).
    replica: Option<PgPool>,
    /// Until when (ms since the Unix epoch) [`Store::decided_dialogs_quickly`] does not
    /// even try: set by its last failure, so an outage costs ingest one bounded wait per
    /// [`PROBE_BACKOFF`], not one per request.
    probe_closed_until_ms: Arc<AtomicU64>,
    /// The task that answers [`Store::decided_dialogs_quickly`] many requests at once;
    /// started on first use.
    lookups: Arc<OnceLock<lookup::Lookups>>,
}

/// How far ahead of this process's clock a flush creates the partition it needs.
const MOST_AHEAD: Duration = Duration::from_secs(366 * 86_400);

/// How long [`Store::decided_dialogs_quickly`] waits for PostgreSQL.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long it stops asking after a failure.
const PROBE_BACKOFF: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Store {
    /// Creates the database when it is missing (and the role may), then a pool. The pool
    /// connects lazily and gives up on a connection after a few seconds, so an outage
    /// turns into prompt errors rather than hung requests.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if !Postgres::database_exists(url).await? {
            match Postgres::create_database(url).await {
                // Another process created it meanwhile.
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
                other => other?,
            }
            tracing::info!("created the database");
        }
        Ok(Self::from_pool(lazy_pool(url)?))
    }

    /// Reads (`GET /data`) go to `replica` from now on: a PostgreSQL streaming replica of
    /// this store's database. Connects lazily, as [`Store::connect`].
    pub fn with_replica(mut self, replica: &str) -> Result<Self, StoreError> {
        self.replica = Some(lazy_pool(replica)?);
        Ok(self)
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            replica: None,
            probe_closed_until_ms: Arc::new(AtomicU64::new(0)),
            lookups: Arc::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations (under sqlx's advisory lock, so concurrent starts
    /// are safe).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(PING).execute(&self.pool).await?;
        Ok(())
    }

    /// Writes dialog states in one transaction under the epoch fence: a state carrying
    /// an unconfirmed refusal erases the dialog first (if that refusal is not fenced);
    /// granted dialogs get their messages inserted (existing (dialog, seq, received_at)
    /// keys are left alone). Pending states are not written. Retried on deadlock; a
    /// message in a month without a partition yet (up to a year ahead) gets it created,
    /// then written.
    pub async fn apply(&self, states: &[DialogState]) -> Result<Applied, StoreError> {
        self.apply_claiming(states, &|_| Box::pin(async { Ok(HashMap::new()) }))
            .await
    }

    /// [`Store::apply`], calling `claim` inside the transaction, after the grants'
    /// upserts have locked their rows and before their messages are inserted: with the
    /// granted dialogs about to be written, it answers which of them must take new seqs,
    /// and after which seq (a life of the dialog that Redis started after the snapshot may
    /// have handed the batch's seqs out again). The flusher's claim is `FlushQueue::claim`.
    pub async fn apply_claiming(&self, states: &[DialogState], claim: &ClaimFn<'_>) -> Result<Applied, StoreError> {
        let mut states: Vec<&DialogState> = states
            .iter()
            .filter(|s| s.decision == Decision::Granted || s.unerased_refusal.is_some())
            .collect();
        // One lock order for every transaction: by dialog id. A dialog named twice keeps
        // its newest state (one statement cannot upsert a row twice).
        states.sort_by_key(|s| (s.dialog, std::cmp::Reverse(s.epoch)));
        states.dedup_by_key(|s| s.dialog);
        let mut attempt = 0;
        loop {
            match self.apply_once(&states, claim).await {
                Err(e) if e.is_retryable() && attempt < 5 => attempt += 1,
                Err(e) if e.is_missing_partition() && attempt < 5 => {
                    attempt += 1;
                    let newest = states
                        .iter()
                        .flat_map(|s| &s.messages)
                        .map(|m| time_of(m.received_at_us))
                        .max()
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                    // A month or two ahead is a clock slightly off; more than a year
                    // is a clock gone wrong, and a partition per month up to it would
                    // be hundreds of tables: the flush fails (and is retried) instead.
                    if newest > OffsetDateTime::now_utc() + MOST_AHEAD {
                        return Err(e);
                    }
                    self.ensure_partitions_through(newest).await?;
                }
                other => return other,
            }
        }
    }

    async fn apply_once(&self, states: &[&DialogState], claim: &ClaimFn<'_>) -> Result<Applied, StoreError> {
        if states.is_empty() {
            return Ok(Applied::default());
        }
        let shard = next_counter_shard();
        let mut tx = if states.iter().any(|s| s.unerased_refusal.is_some()) {
            self.pool.begin_with(sql::BEGIN_ERASING).await?
        } else {
            self.pool.begin().await?
        };
        // A transaction that may insert messages holds the export's shared lock from its
        // first statement to its commit, so that the epoch its rows carry cannot close
        // before they are committed (`export`). First, before any row lock: an export
        // waiting for the exclusive one then waits on no lock this transaction waits for.
        if states
            .iter()
            .any(|s| s.decision == Decision::Granted && !s.messages.is_empty())
        {
            sqlx::query(sql::EXPORT_SHARED).execute(&mut *tx).await?;
        }
        let mut applied = Applied::default();
        // A customer whose erasure is pending has nothing written here: its erasure
        // writes its refusals (and counts what they erase), and nothing of it is flushed;
        // its dialogs stay queued (grants) or unconfirmed (refusals) until it completes.
        let (mut prior, erasing) = prior_decisions(&mut tx, states).await?;
        let (deferred, states): (Vec<&DialogState>, Vec<&DialogState>) =
            states.iter().partition(|s| erasing.contains(&s.customer.get()));
        applied.deferred = deferred.iter().map(|s| s.dialog.get()).collect();
        let mut events = Vec::new();
        apply_refusals(&mut tx, &states, shard, &mut prior, &mut applied).await?;
        apply_grants(&mut tx, &states, shard, claim, &prior, &mut applied, &mut events).await?;
        erasure::write_events(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(applied)
    }

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
            query = query
                .bind(filter.range.after_us.map(bound_time))
                .bind(filter.range.before_us.map(bound_time));
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
    fn read_error(&self, e: sqlx::Error) -> StoreError {
        let lagging = self.replica.is_some()
            && matches!(&e, sqlx::Error::Database(db)
                if db.code().is_some_and(|c| matches!(c.as_ref(), "3D000" | "42P01" | "40001" | "40P01")));
        if lagging { StoreError::Unavailable(e) } else { e.into() }
    }

    /// The pool reads go to: the replica when there is one.
    fn reads(&self) -> &PgPool {
        self.replica.as_ref().unwrap_or(&self.pool)
    }

    /// Waits until the read replica has replayed everything committed on the primary
    /// before this call (at start: the database's creation and migrations), checking
    /// every 10 ms for at most
    /// `bound`: `Err(ReplicaBehind)` past it. At once `Ok` without a replica, or when
    /// the read URL is not in recovery (not a replica at all).
    pub async fn wait_for_replica(&self, bound: Duration) -> Result<(), StoreError> {
        let Some(replica) = &self.replica else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + bound;
        let written: String = sqlx::query_scalar(sql::WAL_WRITTEN).fetch_one(&self.pool).await?;
        loop {
            let replayed: Option<bool> = sqlx::query_scalar(sql::WAL_REPLAYED)
                .bind(&written)
                .fetch_one(replica)
                .await?;
            if replayed != Some(false) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::ReplicaBehind);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the read server shows `dialog` decided at `epoch` or later — the
    /// refusal whose erasure committed in the same transaction, or a newer decision — so
    /// that it no longer shows what the refusal erased. Checked every 10 ms for at most
    /// `bound`: `Err(ReplicaBehind)` past it. At once `Ok` without a replica. Asking the
    /// read server about the dialog itself (rather than comparing WAL positions) holds
    /// whatever it is: a streaming replica, one since promoted, a logical subscriber.
    pub async fn wait_for_replica_to_show(
        &self,
        dialog: DialogId,
        epoch: i64,
        bound: Duration,
    ) -> Result<(), StoreError> {
        let Some(replica) = &self.replica else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let shown: Option<i64> = sqlx::query_scalar(sql::DIALOG_EPOCH)
                .persistent(false)
                .bind(dialog.get())
                .fetch_optional(replica)
                .await
                .map_err(|e| self.read_error(e))?;
            if shown.is_some_and(|shown| shown >= epoch) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::ReplicaBehind);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`Store::wait_for_replica`] for a replica that may not even have the database yet
    /// (at start, right after the primary created and migrated it): any error counts as
    /// "not yet" until `bound` has passed.
    pub async fn replica_caught_up(&self, bound: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.wait_for_replica(left).await {
                Err(e) if !left.is_zero() && !matches!(e, StoreError::ReplicaBehind) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// The read replica's state for `/readyz` and `/metrics`: `None` without one;
    /// else how far its replay is behind the primary, in bytes of WAL and in time since
    /// the last transaction it replayed (0 when it has replayed everything).
    pub async fn replica_lag(&self) -> Option<Result<ReplicaLag, StoreError>> {
        let replica = self.replica.as_ref()?;
        Some(
            async {
                let written: String = sqlx::query_scalar(sql::WAL_WRITTEN).fetch_one(&self.pool).await?;
                let (bytes, seconds): (Option<i64>, Option<f64>) = sqlx::query_as(sql::REPLICA_LAG)
                    .bind(&written)
                    .fetch_one(replica)
                    .await?;
                Ok(ReplicaLag {
                    bytes: bytes.unwrap_or(0).max(0),
                    seconds: if bytes.unwrap_or(0) > 0 {
                        seconds.unwrap_or(0.0).max(0.0)
                    } else {
                        0.0
                    },
                })
            }
            .await,
        )
    }
}

/// How far the read replica is behind (see [`Store::replica_lag`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaLag {
    pub bytes: i64,
    pub seconds: f64,
}

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

struct MessageColumns<'a> {
    dialog_id: Vec<i64>,
    seq: Vec<i64>,
    customer_id: Vec<i64>,
    language: Vec<&'a str>,
    text: Vec<&'a str>,
    received_at: Vec<OffsetDateTime>,
    message_id: Vec<Option<&'a str>>,
}

impl MessageColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        Self {
            dialog_id: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            customer_id: Vec::with_capacity(n),
            language: Vec::with_capacity(n),
            text: Vec::with_capacity(n),
            received_at: Vec::with_capacity(n),
            message_id: Vec::with_capacity(n),
        }
    }
}

/// Counter shards: concurrent transactions spread their count updates over this many rows
/// per counter instead of queueing on one.
const COUNTER_SHARDS: u32 = 16;

/// The shard this transaction writes its counts into: round-robin within a process, and
/// offset by the pid so that processes do not march in step.
pub(crate) fn next_counter_shard() -> i16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(std::process::id());
    i16::try_from(n % COUNTER_SHARDS).unwrap_or(0)
}

/// Microseconds since the Unix epoch → timestamp (values come from Redis's clock).
pub fn time_of(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Microseconds since the Unix epoch as dapi writes `receivedAt`: UTC, RFC 3339 with
/// microseconds (for clients that build a `receivedAfter`, such as dapi-load).
pub fn rfc3339_micros(micros: i64) -> String {
    time_of(micros)
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        ))
        .unwrap_or_default()
}

/// Timestamp → microseconds since the Unix epoch (PostgreSQL keeps microseconds).
pub fn micros_of(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
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

    #[test]
    fn micros_round_trip_through_timestamps() {
        let us = 1_795_000_000_123_456;
        assert_eq!(micros_of(time_of(us)), us);
    }
}
