//! `--export`: an analyst's job that syncs while the traffic runs. It follows
//! `GET /data/export` resume tokens every `--export-every`, from a fresh export of what
//! was received since just before the run, and keeps how often each message arrived. A
//! body without its final resume line is incomplete: its lines are dropped and the same
//! token asked again (as docs/api.md tells a client to). After the loss check, it syncs
//! until an export sends nothing; the check then requires every acknowledged message of a
//! granted dialog (that no erasure took) received exactly once, none received twice, and
//! nothing of a refused or undecided dialog.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{Client, PATIENT, backoff};
use crate::record::{Endpoint, Fate, Record, Tally};
use crate::worker::Plan;

/// What the exporter received.
#[derive(Debug, Default)]
pub(crate) struct Exported {
    /// (dialog, seq) → how many times, for this run's customers.
    pub(crate) received: HashMap<(i64, i64), u32>,
    pub(crate) syncs: u64,
    pub(crate) messages: u64,
    /// Bodies that ended without a resume line (dropped and asked again).
    pub(crate) incomplete: u64,
    /// Where the next sync starts.
    token: String,
    /// The exclusive lower bound of the first export: just before the run.
    since: String,
}

/// What the check found of the export.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct ExportCheck {
    pub(crate) syncs: u64,
    pub(crate) messages_received: u64,
    pub(crate) incomplete_bodies: u64,
    /// Acknowledged messages of granted dialogs (no erasure involved) never received.
    pub(crate) missing: usize,
    /// Messages received more than once.
    pub(crate) duplicated: usize,
    /// Messages of refused or undecided dialogs received.
    pub(crate) leaked: usize,
}

impl ExportCheck {
    pub(crate) fn failures(&self) -> usize {
        self.missing + self.duplicated + self.leaked
    }
}

impl Exported {
    pub(crate) fn new(started: std::time::SystemTime) -> Self {
        // A minute of slack for a dapi whose clock is behind this machine's.
        let since = started
            .checked_sub(Duration::from_secs(60))
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let since = dapi::store::rfc3339_micros(i64::try_from(since.as_micros()).unwrap_or(0));
        Self {
            since,
            ..Self::default()
        }
    }

    /// One export from the current token; how many messages it sent, `None` if it failed.
    async fn sync_once(&mut self, plan: &Plan, client: &Client, record: &mut Record) -> Option<usize> {
        let mut url = format!(
            "/data/export?limit={}&receivedAfter={}",
            plan.args.export_limit, self.since
        );
        if !self.token.is_empty() {
            url = format!("/data/export?limit={}&resume={}", plan.args.export_limit, self.token);
        }
        let mut request = client.http.get(client.url(&url)).timeout(PATIENT);
        if let Some(token) = &client.read_token {
            request = request.bearer_auth(token);
        }
        let sent = Instant::now();
        let response = request.send().await.ok();
        let status = response.as_ref().map(|r| r.status().as_u16());
        let body = match response {
            Some(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        record.note(Endpoint::Export, sent, status, &Tally::default());
        self.syncs += 1;
        let body = body?;
        let mut lines: Vec<Value> = body.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let resume = match lines.pop() {
            Some(last) if body.ends_with('\n') && last.get("resume").is_some() => last["resume"].as_str()?.to_owned(),
            _ => {
                self.incomplete += 1;
                return None;
            }
        };
        let customers = plan.customer_base..plan.customer_base + plan.args.customers as i64;
        for m in &lines {
            let (Some(customer), Some(dialog), Some(seq)) =
                (m["customerId"].as_i64(), m["dialogId"].as_i64(), m["seq"].as_i64())
            else {
                continue;
            };
            if customers.contains(&customer) {
                *self.received.entry((dialog, seq)).or_default() += 1;
            }
        }
        self.messages += lines.len() as u64;
        self.token = resume;
        Some(lines.len())
    }

    /// Syncs until an export sends fewer than `--export-limit` messages (caught up), or
    /// fails `retries` times in a row.
    pub(crate) async fn catch_up(&mut self, plan: &Plan, client: &Client, record: &mut Record) -> bool {
        let mut failures = 0;
        loop {
            match self.sync_once(plan, client, record).await {
                Some(n) if n < plan.args.export_limit as usize => return true,
                Some(_) => failures = 0,
                None if failures >= client.retries.max(3) => return false,
                None => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    /// Compares what arrived with what the run acknowledged and decided. `erased`:
    /// (dialog, seq) an erasure took or may have taken (an export may have sent them
    /// before it: they are only checked for duplicates).
    pub(crate) fn check(&self, record: &Record, erased: &dyn Fn(i64, i64) -> bool) -> ExportCheck {
        let mut check = ExportCheck {
            syncs: self.syncs,
            messages_received: self.messages,
            incomplete_bodies: self.incomplete,
            duplicated: self.received.values().filter(|n| **n > 1).count(),
            ..ExportCheck::default()
        };
        let mut by_dialog: HashMap<i64, Vec<i64>> = HashMap::new();
        for (dialog, seq) in self.received.keys() {
            by_dialog.entry(*dialog).or_default().push(*seq);
        }
        for (dialog, outcome) in &record.dialogs {
            match outcome.fate {
                Fate::Granted => {
                    check.missing += outcome
                        .acked
                        .keys()
                        .filter(|seq| !erased(*dialog, **seq) && !self.received.contains_key(&(*dialog, **seq)))
                        .count();
                }
                Fate::Refused | Fate::Undecided => {
                    check.leaked += by_dialog
                        .get(dialog)
                        .map_or(0, |seqs| seqs.iter().filter(|seq| !erased(*dialog, **seq)).count());
                }
            }
        }
        check
    }
}

/// Syncs every `--export-every` until the deadline; returns what it received.
pub(crate) async fn exporter(plan: Arc<Plan>, client: Arc<Client>, mut exported: Exported) -> (Exported, Record) {
    let mut record = Record::new();
    while Instant::now() < plan.deadline {
        exported.catch_up(&plan, &client, &mut record).await;
        tokio::time::sleep(plan.args.export_every).await;
    }
    (exported, record)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use super::Exported;
    use crate::record::{Acked, Fate, Outcome, Record};

    fn outcome(fate: Fate, seqs: &[i64]) -> Outcome {
        let now = Instant::now();
        Outcome {
            customer: 1,
            acked: seqs
                .iter()
                .map(|s| {
                    (
                        *s,
                        Acked {
                            id: format!("m{s}"),
                            sent: now,
                            at: now,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            fate,
            decision: None,
        }
    }

    #[test]
    fn the_export_check_finds_what_is_missing_repeated_or_leaked() {
        let mut record = Record::new();
        record.dialogs.insert(1, outcome(Fate::Granted, &[1, 2, 3]));
        record.dialogs.insert(2, outcome(Fate::Refused, &[1]));
        record.dialogs.insert(3, outcome(Fate::Undecided, &[1]));
        record.dialogs.insert(4, outcome(Fate::Granted, &[1]));
        let mut exported = Exported::default();
        exported
            .received
            .extend([((1, 1), 1), ((1, 2), 2), ((2, 1), 1), ((4, 1), 1)]);
        let none = |_: i64, _: i64| false;
        let check = exported.check(&record, &none);
        assert_eq!((check.missing, check.duplicated, check.leaked), (1, 1, 1));
        // An erasure's messages: neither missing nor leaked.
        let erased = |d: i64, _: i64| d == 1 || d == 2;
        let check = exported.check(&record, &erased);
        assert_eq!((check.missing, check.duplicated, check.leaked), (0, 1, 0));
        exported.received.insert((1, 2), 1);
        exported.received.insert((1, 3), 1);
        exported.received.remove(&(2, 1));
        assert_eq!(exported.check(&record, &none).failures(), 0);
    }
}
