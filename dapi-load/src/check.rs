//! The loss check: after the run, read back every message of the run's customers and
//! compare with what was acknowledged and decided.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::client::{Client, PATIENT};
use crate::record::{Fate, Record, Tally};

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
}

/// Reads back until every acknowledged message of a granted dialog is readable, or
/// until `settle` has passed; `None` when a read failed.
pub(crate) async fn check(client: &Client, record: &Record, settle: Duration) -> Option<Check> {
    let mut customers: BTreeSet<i64> = BTreeSet::new();
    let mut expected = 0;
    for outcome in record.dialogs.values() {
        customers.insert(outcome.customer);
        if outcome.fate == Fate::Granted {
            expected += outcome.acked.len();
        }
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
        let mut readable_granted = 0;
        let none = BTreeSet::new();
        for (dialog, outcome) in &record.dialogs {
            let stored = by_dialog.get(dialog).unwrap_or(&none);
            match outcome.fate {
                Fate::Granted => {
                    result.granted_dialogs += 1;
                    result.acknowledged_granted_messages += outcome.acked.len();
                    for (seq, id) in &outcome.acked {
                        match seen.get(&(*dialog, *seq)) {
                            Some((_, read)) => {
                                readable_granted += 1;
                                if read.as_deref() != Some(id.as_str()) {
                                    result.wrong_message_id += 1;
                                }
                            }
                            None => result.lost += 1,
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
        if readable_granted >= expected || Instant::now() >= deadline {
            return Some(result);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
