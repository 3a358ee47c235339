//! Staging messages, for `POST /data/{customerId}/{dialogId}` (one) and `POST /data` (a
//! batch): [`stage`] makes one script call for everything Redis knows, then — only if
//! some dialog is new to Redis — one PostgreSQL lookup for those dialogs (bounded; never
//! waited on during an outage) and one more script call that creates them. Dialogs this
//! process has not staged lately are looked up *before* the first call, whose answer then
//! creates them at once ([`super::recent`]).

use std::time::Duration;

use time::OffsetDateTime;

use super::recent::Recent;
use crate::domain::{CustomerId, Decision, DialogId, IncomingMessage};
use crate::staging::{Create, IngestOutcome, NewMessage, Staging, StagingError};
use crate::store::{HeldDialog, Known, Store, StoreError};
use crate::telemetry::REQUEST_QUARANTINED;

/// What staging needs: the two stores, what this process staged lately, and how long
/// Redis remembers a refusal (`DAPI_STAGING_TTL`).
#[derive(Debug, Clone, Copy)]
pub struct IngestPath<'a> {
    pub staging: &'a Staging,
    pub store: &'a Store,
    pub recent: &'a Recent,
    pub staging_ttl: Duration,
}

/// One message offered for staging.
#[derive(Debug)]
pub struct Offer {
    pub customer: CustomerId,
    pub dialog: DialogId,
    pub message: IncomingMessage,
}

/// Stages `offers`, in order: items of one dialog get consecutive seqs in that order.
/// `Err` when Redis failed before anything was staged; otherwise one outcome per offer,
/// an `Err` for the offers a later failure left unstaged.
pub async fn stage(
    path: &IngestPath<'_>,
    offers: &[Offer],
) -> Result<Vec<Result<IngestOutcome, StagingError>>, StagingError> {
    let creates = ask_first(path, offers).await;
    let first: Vec<NewMessage<'_>> = offers
        .iter()
        .zip(&creates)
        .map(|(o, create)| NewMessage {
            customer: o.customer,
            dialog: o.dialog,
            message: &o.message,
            create: create.unwrap_or(Create::Not),
        })
        .collect();
    let mut outcomes = path.staging.stage(&first).await?;
    for (create, outcome) in creates.iter().zip(&outcomes) {
        // Did asking first save a call? Yes when the script created the dialog.
        let new = match (create, outcome) {
            (Some(Create::New), Ok(IngestOutcome::Accepted { seq, duplicate, .. })) => !duplicate && *seq == 1,
            (Some(Create::Revive { last_seq }), Ok(IngestOutcome::Accepted { seq, duplicate, .. })) => {
                !duplicate && *seq == last_seq + 1
            }
            _ => continue,
        };
        path.recent.record(new);
    }
    for (offer, outcome) in offers.iter().zip(&outcomes) {
        if matches!(outcome, Ok(IngestOutcome::SetAside)) {
            metrics::counter!(REQUEST_QUARANTINED).increment(1);
            tracing::error!(
                dialog = offer.dialog.get(),
                "set aside keys of a dialog that held a type dapi does not write there; staged as for a \
                 dialog Redis forgot (docs/operations.md, \"Quarantine\")"
            );
        }
    }
    let unknown: Vec<usize> = (0..offers.len())
        .filter(|&i| matches!(outcomes[i], Ok(IngestOutcome::Unknown | IngestOutcome::SetAside)))
        .collect();
    if unknown.is_empty() {
        return Ok(outcomes);
    }

    // Dialogs Redis does not know: new, or forgotten while PostgreSQL holds them as
    // granted or refused. Ask PostgreSQL, briefly; if it cannot say, the flusher settles
    // them.
    let decided = look_up(path, unknown.iter().map(|&i| &offers[i])).await;
    let mut second = Vec::with_capacity(unknown.len());
    let mut second_at = Vec::with_capacity(unknown.len());
    for &i in &unknown {
        let offer = &offers[i];
        let create = match verdict(&decided, offer, path.staging_ttl) {
            Verdict::Create(create) => create,
            Verdict::Mismatch => {
                outcomes[i] = Ok(IngestOutcome::CustomerMismatch);
                continue;
            }
            Verdict::Refused => {
                outcomes[i] = Ok(IngestOutcome::ConsentRefused);
                continue;
            }
            Verdict::Stored { seq } => {
                outcomes[i] = Ok(IngestOutcome::Accepted {
                    seq,
                    decision: Decision::Granted,
                    duplicate: true,
                });
                continue;
            }
        };
        second.push(NewMessage {
            customer: offer.customer,
            dialog: offer.dialog,
            message: &offer.message,
            create,
        });
        second_at.push(i);
    }
    match path.staging.stage(&second).await {
        Ok(created) => {
            for (i, outcome) in second_at.into_iter().zip(created) {
                outcomes[i] = match outcome {
                    Ok(IngestOutcome::Unknown) => Err(StagingError::Corrupt(
                        "the ingest script did not create the dialog it was told to",
                    )),
                    // Keys of a wrong type again, written between the two calls: nothing
                    // staged, and a retry is safe.
                    Ok(IngestOutcome::SetAside) => Err(StagingError::Interrupted),
                    outcome => outcome,
                };
            }
        }
        Err(e) => {
            // Part-way: what the first call staged stands; these were not staged (or, when
            // only the replicas did not confirm them, may be: a retry is safe either way).
            tracing::warn!(error = %crate::telemetry::chain(&e), "Redis failed part-way through a batch");
            for i in second_at {
                outcomes[i] = Err(match e {
                    StagingError::NotReplicated { acked, wanted } => StagingError::NotReplicated { acked, wanted },
                    _ => StagingError::Interrupted,
                });
            }
        }
    }
    Ok(outcomes)
}

/// For each offer, how the first script call creates its dialog should Redis not know it:
/// `None` (don't: answer 'unknown') for dialogs this process staged lately, else what
/// PostgreSQL says of the dialog now — asked here, before the call, while that pays off
/// ([`super::recent`]). A dialog PostgreSQL holds under another customer, or as refused, is
/// left to the usual path (`None`), so that Redis's own record decides when it has one.
async fn ask_first(path: &IngestPath<'_>, offers: &[Offer]) -> Vec<Option<Create>> {
    let mut creates = vec![None; offers.len()];
    if !path.recent.ask_first() {
        for offer in offers {
            path.recent.first_sighting(offer.dialog);
        }
        return creates;
    }
    let unseen: Vec<usize> = (0..offers.len())
        .filter(|&i| path.recent.first_sighting(offers[i].dialog))
        .collect();
    if unseen.is_empty() {
        return creates;
    }
    let decided = look_up(path, unseen.iter().map(|&i| &offers[i])).await;
    for i in unseen {
        if let Verdict::Create(create) = verdict(&decided, &offers[i], path.staging_ttl) {
            creates[i] = Some(create);
        }
    }
    creates
}

/// Asks PostgreSQL what it holds of the offers' dialogs, and of their messageIds.
async fn look_up<'a>(path: &IngestPath<'_>, offers: impl Iterator<Item = &'a Offer>) -> Result<Known, StoreError> {
    let mut dialogs = Vec::new();
    let mut message_ids = Vec::new();
    for offer in offers {
        dialogs.push(offer.dialog);
        if let Some(id) = &offer.message.message_id {
            message_ids.push((offer.dialog, id.as_str().to_owned()));
        }
    }
    dialogs.sort_unstable();
    dialogs.dedup();
    path.store.decided_dialogs_quickly(&dialogs, &message_ids).await
}

/// What to do with an offer whose dialog Redis does not know, by what PostgreSQL holds.
enum Verdict {
    /// Stage it, creating the dialog so.
    Create(Create),
    /// PostgreSQL holds the dialog under another customer.
    Mismatch,
    /// PostgreSQL holds a refusal made within `DAPI_STAGING_TTL`: the dialog is still
    /// refused, as Redis would say had it not forgotten it (a restart without
    /// persistence, a failover); an older refusal is forgotten, as Redis forgets it.
    Refused,
    /// PostgreSQL stores the offer's messageId for the dialog already, under this seq: a
    /// retry Redis cannot recognise any more (it lost the dialog), answered as the
    /// duplicate it is (Guarantee 8).
    Stored { seq: i64 },
}

/// The verdict on `offer`, whose dialog Redis does not know, from what PostgreSQL said
/// (`decided`: what it holds of the dialogs asked about, or its failure).
fn verdict(decided: &Result<Known, StoreError>, offer: &Offer, ttl: Duration) -> Verdict {
    let known = match decided {
        Ok(known) => known,
        Err(_) => return Verdict::Create(Create::Unverified),
    };
    let held = known.dialogs.get(&offer.dialog);
    if let (Some(HeldDialog::Granted(g)), Some(id)) = (held, &offer.message.message_id)
        && g.customer == offer.customer
        && let Some(&seq) = known.message_ids.get(&(offer.dialog, id.as_str().to_owned()))
    {
        return Verdict::Stored { seq };
    }
    match held {
        None => Verdict::Create(Create::New),
        Some(HeldDialog::Granted(g)) if g.customer != offer.customer => Verdict::Mismatch,
        Some(HeldDialog::Granted(g)) => Verdict::Create(Create::Revive { last_seq: g.last_seq }),
        Some(HeldDialog::Refused { customer, .. }) if *customer != offer.customer => Verdict::Mismatch,
        Some(HeldDialog::Refused { decided_at, .. }) if *decided_at + ttl > OffsetDateTime::now_utc() => {
            Verdict::Refused
        }
        Some(HeldDialog::Refused { .. }) => Verdict::Create(Create::New),
    }
}
