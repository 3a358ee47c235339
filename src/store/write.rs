//! The batch write that the flusher and the refusal handler share ([`Store::apply`]):
//! one transaction per batch under the epoch fence (see the module `store`), in three
//! steps — the decisions PostgreSQL holds read and locked first ([`prior_decisions`]),
//! then the refusals with their erasures ([`apply_refusals`]), then the grants with their
//! messages ([`apply_grants`]) — and the audit events of each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use sqlx::Postgres;
use time::OffsetDateTime;

use super::sql::{
    ERASE_DIALOGS_AUDITED, INSERT_MESSAGES, NEWER_DECISIONS, PRIOR_DECISIONS, RAISE_LAST_SEQ, UPSERT_DIALOGS,
};
use super::{Store, StoreError, erasure, micros_of, next_counter_shard, sql, stored_message_ids_in, time_of};
use crate::domain::{CustomerId, Decision, DialogState, Refusal, TakeBack};

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

/// How far ahead of this process's clock a flush creates the partition it needs.
const MOST_AHEAD: Duration = Duration::from_secs(366 * 86_400);

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

impl Store {
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
}
