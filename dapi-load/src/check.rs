//! The loss check: after the run, read back every message of the run's customers and
//! compare with what was acknowledged and decided — and, with `--erase-rate`, erased.
//!
//! A message of an erased customer acknowledged (202) before the erasure's request was
//! sent must be gone, and its dialog must read as refused (unless the bot decided it again
//! after that); one whose request was sent after the erasure was seen completed is
//! checked as any other; one in flight while the erasure ran may go either way.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::client::{Client, PATIENT, Reply, backoff};
use crate::erase::{Erasure, State};
use crate::record::{Acked, Fate, Outcome, Record, Tally};

/// What the check requires of one acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// As without erasures: readable if its dialog is granted, else not.
    AsDecided,
    /// Acknowledged before an erasure of its customer was sent: never readable.
    Erased,
    /// In flight while an erasure ran (or its customer had an erasure of unknown effect):
    /// erased or kept, both are right.
    Either,
}

/// The rule for `message`, given its customer's `erasures`.
pub(crate) fn rule(message: &Acked, erasures: &[&Erasure]) -> Rule {
    if erasures.iter().any(|e| e.recorded() && message.at < e.sent) {
        return Rule::Erased;
    }
    let racing = |e: &&Erasure| match e.state {
        State::Unknown => true,
        State::Rejected => false,
        // Sent before the erasure was seen completed, answered after it was sent.
        State::Completed | State::Pending => e.completed.is_none_or(|done| message.sent < done),
    };
    if erasures.iter().any(racing) {
        Rule::Either
    } else {
        Rule::AsDecided
    }
}

/// Whether the dialog must read as refused: it has a message erased by a completed erasure
/// whose request was sent after the bot's decision of the dialog (if any) was answered, or
/// the bot refused it.
fn must_read_refused(outcome: &Outcome, erasures: &[&Erasure]) -> bool {
    let latest = erasures
        .iter()
        .filter(|e| e.state == State::Completed && outcome.acked.values().any(|m| m.at < e.sent))
        .map(|e| e.sent)
        .max();
    let Some(latest) = latest else {
        return false;
    };
    match (outcome.fate, outcome.decision) {
        (Fate::Refused, _) | (_, None) => true,
        (_, Some((_, answered))) => answered < latest,
    }
}

/// The consent `GET /consents/{dialogId}` reads for `dialog`; `None` if no try got an answer.
async fn consent(client: &Client, dialog: i64) -> Option<String> {
    let mut attempt = 0;
    loop {
        match client.consent(dialog, PATIENT).await {
            Reply::Answer(200, answer) => return Some(answer["consent"].as_str().unwrap_or_default().to_owned()),
            Reply::Answer(status, _) if status != 503 => return Some(format!("status {status}")),
            _ if attempt >= client.retries.max(3) => return None,
            _ => {}
        }
        attempt += 1;
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// A message read back: where it is stored, and its `messageId`.
struct Stored {
    dialog: i64,
    seq: i64,
    message_id: Option<String>,
}

/// Every message readable for `customer`, by cursor scan; `None` if a step failed.
async fn readable(client: &Client, customer: i64) -> Option<Vec<Stored>> {
    let mut found = Vec::new();
    let mut next = Some(format!("/data/?customerId={customer}&pageSize=1000&cursor="));
    while let Some(url) = next {
        let (status, page) = client
            .call(&url, None, PATIENT, client.retries.max(3), &mut Tally::default())
            .await?;
        if status != 200 {
            return None;
        }
        for m in page["results"].as_array()? {
            found.push(Stored {
                dialog: m["dialogId"].as_i64()?,
                seq: m["seq"].as_i64()?,
                message_id: m["messageId"].as_str().map(str::to_owned),
            });
        }
        next = page["next"].as_str().map(str::to_owned);
    }
    Some(found)
}

#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Check {
    pub(crate) granted_dialogs: usize,
    pub(crate) refused_dialogs: usize,
    pub(crate) undecided_dialogs: usize,
    pub(crate) acknowledged_granted_messages: usize,
    pub(crate) lost: usize,
    /// (dialog, seq) readable more than once, plus messages stored more than once (the
    /// same `messageId` under several seqs — a resend that was staged again).
    pub(crate) duplicated: usize,
    /// The second part of `duplicated`.
    pub(crate) message_id_stored_twice: usize,
    pub(crate) leaked: usize,
    pub(crate) unacknowledged_but_stored: usize,
    /// Acknowledged seqs readable under another `messageId` than the one sent for them.
    pub(crate) wrong_message_id: usize,
    /// With `--erase-rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) erasure: Option<ErasureCheck>,
    /// With `--export`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) export: Option<crate::export::ExportCheck>,
}

/// (dialog, seq) → its rule, for the acknowledged messages whose rule is not
/// [`Rule::AsDecided`] (those of erased customers).
pub(crate) fn erasure_rules(record: &Record, erasures: &[Erasure]) -> HashMap<(i64, i64), Rule> {
    let mut by_customer: HashMap<i64, Vec<&Erasure>> = HashMap::new();
    for erasure in erasures {
        by_customer.entry(erasure.customer).or_default().push(erasure);
    }
    let mut rules = HashMap::new();
    for (dialog, outcome) in &record.dialogs {
        let erasures = by_customer
            .get(&outcome.customer)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (seq, message) in &outcome.acked {
            let rule = rule(message, erasures);
            if rule != Rule::AsDecided {
                rules.insert((*dialog, *seq), rule);
            }
        }
    }
    rules
}

/// What the check found of the erasures; every message counted in `erased_but_readable`
/// or `erased_dialog_not_refused` is counted in `leaked` too.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct ErasureCheck {
    /// Acknowledged before their customer's erasure was sent: must not be readable.
    pub(crate) erased_messages: usize,
    /// Of those, still readable.
    pub(crate) erased_but_readable: usize,
    /// Of those, not readable but in a dialog that does not read as refused.
    pub(crate) erased_dialog_not_refused: usize,
    /// Dialogs that must read as refused, and those of them that do not.
    pub(crate) erased_dialogs: usize,
    pub(crate) erased_dialogs_not_refused: usize,
    /// Acknowledged while an erasure of their customer ran: either way is right.
    pub(crate) racing_messages: usize,
}

/// Reads back until every acknowledged message of a granted dialog that must be readable
/// is, or until `settle` has passed; `None` when a read failed. `erasures`: those of the
/// run (none without `--erase-rate`).
pub(crate) async fn check(client: &Client, record: &Record, erasures: &[Erasure], settle: Duration) -> Option<Check> {
    let mut by_customer: HashMap<i64, Vec<&Erasure>> = HashMap::new();
    for erasure in erasures {
        by_customer.entry(erasure.customer).or_default().push(erasure);
    }
    // (dialog, seq) → its rule, for the messages of erased customers; dialogs that must
    // read as refused → whether they do.
    let mut rules: HashMap<(i64, i64), Rule> = HashMap::new();
    let mut refused: HashMap<i64, bool> = HashMap::new();
    let mut customers: BTreeSet<i64> = BTreeSet::new();
    let mut expected = 0;
    for (dialog, outcome) in &record.dialogs {
        customers.insert(outcome.customer);
        let erasures = by_customer
            .get(&outcome.customer)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (seq, message) in &outcome.acked {
            let rule = rule(message, erasures);
            if rule != Rule::AsDecided {
                rules.insert((*dialog, *seq), rule);
            } else if outcome.fate == Fate::Granted {
                expected += 1;
            }
        }
        if must_read_refused(outcome, erasures) {
            refused.insert(*dialog, false);
        }
    }
    for (dialog, reads_refused) in refused.iter_mut() {
        *reads_refused = consent(client, *dialog).await? == "refused";
    }
    let deadline = Instant::now() + settle;
    loop {
        // (dialog, seq) → how often readable, and the messageId read last.
        let mut seen: HashMap<(i64, i64), (usize, Option<String>)> = HashMap::new();
        let mut by_dialog: HashMap<i64, BTreeSet<i64>> = HashMap::new();
        let mut places: HashMap<String, BTreeSet<(i64, i64)>> = HashMap::new();
        for &customer in &customers {
            for m in readable(client, customer).await? {
                by_dialog.entry(m.dialog).or_default().insert(m.seq);
                if let Some(id) = &m.message_id {
                    places.entry(id.clone()).or_default().insert((m.dialog, m.seq));
                }
                let entry = seen.entry((m.dialog, m.seq)).or_default();
                entry.0 += 1;
                entry.1 = m.message_id;
            }
        }
        let mut result = Check::default();
        let mut erasure = ErasureCheck {
            erased_dialogs: refused.len(),
            erased_dialogs_not_refused: refused.values().filter(|r| !**r).count(),
            ..ErasureCheck::default()
        };
        let mut readable_granted = 0;
        let none = BTreeSet::new();
        for (dialog, outcome) in &record.dialogs {
            let stored = by_dialog.get(dialog).unwrap_or(&none);
            let reads_refused = refused.get(dialog).copied().unwrap_or(true);
            // The messages an erasure took: none readable, their dialog refused. Those of
            // a refused or undecided dialog readable are counted as leaked below.
            for seq in outcome.acked.keys() {
                match rules.get(&(*dialog, *seq)) {
                    Some(Rule::Erased) => {
                        erasure.erased_messages += 1;
                        if seen.contains_key(&(*dialog, *seq)) {
                            erasure.erased_but_readable += 1;
                            result.leaked += usize::from(outcome.fate == Fate::Granted);
                        } else if !reads_refused {
                            erasure.erased_dialog_not_refused += 1;
                            result.leaked += 1;
                        }
                    }
                    Some(Rule::Either) => erasure.racing_messages += 1,
                    _ => {}
                }
            }
            match outcome.fate {
                Fate::Granted => {
                    result.granted_dialogs += 1;
                    result.acknowledged_granted_messages += outcome.acked.len();
                    for (seq, message) in &outcome.acked {
                        let rule = rules.get(&(*dialog, *seq)).copied().unwrap_or(Rule::AsDecided);
                        match (seen.get(&(*dialog, *seq)), rule) {
                            (_, Rule::Erased) => {}
                            (Some((_, read)), _) => {
                                readable_granted += usize::from(rule == Rule::AsDecided);
                                if read.as_deref() != Some(message.id.as_str()) {
                                    result.wrong_message_id += 1;
                                }
                            }
                            (None, Rule::AsDecided) => result.lost += 1,
                            (None, _) => {}
                        }
                    }
                    result.unacknowledged_but_stored +=
                        stored.iter().filter(|s| !outcome.acked.contains_key(*s)).count();
                }
                Fate::Refused => {
                    result.refused_dialogs += 1;
                    result.leaked += stored.len();
                }
                Fate::Undecided => {
                    result.undecided_dialogs += 1;
                    result.leaked += stored.len();
                }
            }
        }
        result.message_id_stored_twice = places.values().map(|p| p.len() - 1).sum();
        result.duplicated = seen.values().filter(|(n, _)| *n > 1).count() + result.message_id_stored_twice;
        if !erasures.is_empty() {
            result.erasure = Some(erasure);
        }
        if readable_granted >= expected || Instant::now() >= deadline {
            return Some(result);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::{Rule, must_read_refused, rule};
    use crate::erase::{Erasure, State};
    use crate::record::{Acked, Fate, Outcome};

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn message(t0: Instant, sent: u64, acked: u64) -> Acked {
        Acked {
            id: "m".to_owned(),
            sent: at(t0, sent),
            at: at(t0, acked),
        }
    }

    fn erasure(t0: Instant, sent: u64, completed: Option<u64>, state: State) -> Erasure {
        Erasure {
            customer: 1,
            sent: at(t0, sent),
            completed: completed.map(|ms| at(t0, ms)),
            was_pending: false,
            state,
        }
    }

    #[test]
    fn a_message_acknowledged_before_the_erasure_was_sent_must_be_gone() {
        let t0 = Instant::now();
        let done = erasure(t0, 100, Some(150), State::Completed);
        assert_eq!(rule(&message(t0, 10, 20), &[&done]), Rule::Erased);
        // Still pending at the end: recorded, so nothing before it may be readable.
        let pending = erasure(t0, 100, None, State::Pending);
        assert_eq!(rule(&message(t0, 10, 20), &[&pending]), Rule::Erased);
        // A later erasure of the same customer takes it even after an earlier one.
        let later = erasure(t0, 400, Some(450), State::Completed);
        assert_eq!(rule(&message(t0, 200, 210), &[&done, &later]), Rule::Erased);
    }

    #[test]
    fn a_message_in_flight_during_the_erasure_may_go_either_way() {
        let t0 = Instant::now();
        let done = erasure(t0, 100, Some(150), State::Completed);
        // Answered after the request was sent, sent before the erasure completed.
        assert_eq!(rule(&message(t0, 90, 110), &[&done]), Rule::Either);
        assert_eq!(rule(&message(t0, 120, 160), &[&done]), Rule::Either);
        // A pending erasure never seen completed covers everything after it.
        let pending = erasure(t0, 100, None, State::Pending);
        assert_eq!(rule(&message(t0, 5_000, 5_010), &[&pending]), Rule::Either);
        // An erasure of unknown effect: anything of the customer.
        let unknown = erasure(t0, 100, None, State::Unknown);
        assert_eq!(rule(&message(t0, 10, 20), &[&unknown]), Rule::Either);
    }

    #[test]
    fn a_message_sent_after_the_erasure_completed_is_checked_as_decided() {
        let t0 = Instant::now();
        let done = erasure(t0, 100, Some(150), State::Completed);
        assert_eq!(rule(&message(t0, 150, 160), &[&done]), Rule::AsDecided);
        assert_eq!(rule(&message(t0, 10, 20), &[]), Rule::AsDecided);
        // A refused DELETE (401, 403) erased nothing.
        let rejected = erasure(t0, 100, None, State::Rejected);
        assert_eq!(rule(&message(t0, 10, 20), &[&rejected]), Rule::AsDecided);
    }

    #[test]
    fn an_erased_dialog_reads_refused_unless_the_bot_decided_it_after_the_erasure() {
        let t0 = Instant::now();
        let done = erasure(t0, 100, Some(150), State::Completed);
        let dialog = |fate, decision: Option<(u64, u64)>| Outcome {
            customer: 1,
            acked: BTreeMap::from([(1, message(t0, 10, 20))]),
            fate,
            decision: decision.map(|(s, a)| (at(t0, s), at(t0, a))),
        };
        assert!(must_read_refused(&dialog(Fate::Undecided, None), &[&done]));
        assert!(must_read_refused(&dialog(Fate::Granted, Some((30, 40))), &[&done]));
        assert!(must_read_refused(&dialog(Fate::Refused, Some((120, 130))), &[&done]));
        // A grant racing or following the erasure may stand.
        assert!(!must_read_refused(&dialog(Fate::Granted, Some((90, 110))), &[&done]));
        assert!(!must_read_refused(&dialog(Fate::Granted, Some((200, 210))), &[&done]));
        // Only a completed erasure is required to have refused it.
        let pending = erasure(t0, 100, None, State::Pending);
        assert!(!must_read_refused(&dialog(Fate::Undecided, None), &[&pending]));
    }
}
