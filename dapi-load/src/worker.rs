//! The traffic: a `Plan` shared by all workers, and each `Worker` running its dialogs —
//! messages, one at a time or in batches, decisions, analysts' reads — and probing how
//! soon granted messages are readable.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::Args;
use crate::client::{Client, PATIENT, Reply, Staged};
use crate::record::{Acked, Endpoint, Fate, Outcome, Record, Tally};

/// What all workers share: the arguments, this run's IDs, the counters and the deadline.
pub(crate) struct Plan {
    pub(crate) args: Args,
    /// Grant → readable latencies (µs), and probes that gave up after 10 s.
    pub(crate) visibility: std::sync::Mutex<Histogram<u64>>,
    pub(crate) invisible: AtomicU64,
    /// First customer and dialog ID of this run: fresh IDs, so the check reads only them.
    pub(crate) customer_base: i64,
    pub(crate) dialog_base: i64,
    /// First part of every `messageId` of this run.
    pub(crate) run: String,
    pub(crate) next_dialog: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) staged: AtomicU64,
    pub(crate) deadline: Instant,
    /// With `--erase-rate`: by customer index, whether a message of it was acknowledged
    /// (the eraser picks among those); empty without.
    pub(crate) posted: Vec<AtomicBool>,
    /// Customers whose erasure was requested: a probe of theirs that never sees its
    /// message readable is not counted as not readable.
    pub(crate) erased: std::sync::Mutex<HashSet<i64>>,
}

impl Plan {
    fn posted_for(&self, customer: i64) {
        if let Some(flag) = usize::try_from(customer - self.customer_base)
            .ok()
            .and_then(|i| self.posted.get(i))
        {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// A dialog a worker is running.
struct Dialog {
    id: i64,
    customer: i64,
    fate: Fate,
    /// Messages before the decision: steps 0 … messages − 1. Step `messages` is the
    /// decision, step `messages + 1` the message after a grant, when there is one.
    messages: u64,
    after_grant: bool,
    /// Messages put into a request so far, and sent so far.
    queued: u64,
    sent: u64,
    /// Whether its decision was answered.
    decided: bool,
    /// When its decision was sent and answered.
    decision: Option<(Instant, Instant)>,
    acked: BTreeMap<i64, Acked>,
}

impl Dialog {
    fn outcome(self) -> Outcome {
        Outcome {
            customer: self.customer,
            acked: self.acked,
            // A decision never sent leaves the dialog undecided.
            fate: if self.decided { self.fate } else { Fate::Undecided },
            decision: self.decision,
        }
    }
}

/// One message of a dialog.
struct Message {
    dialog: i64,
    customer: i64,
    step: u64,
    id: String,
}

impl Message {
    fn new(plan: &Plan, dialog: &Dialog, step: u64) -> Self {
        Self {
            dialog: dialog.id,
            customer: dialog.customer,
            step,
            id: format!("{}-{}-{step}", plan.run, dialog.id),
        }
    }

    fn text(&self) -> String {
        format!("load message {} of dialog {}", self.step, self.dialog)
    }

    fn language(&self) -> &'static str {
        if self.step.is_multiple_of(3) { "EN" } else { "de" }
    }
}

struct Worker {
    plan: Arc<Plan>,
    client: Arc<Client>,
    rng: Rng,
    record: Record,
    probes: tokio::task::JoinSet<()>,
    /// Pace: each worker sends rate/concurrency requests per second.
    interval: Option<Duration>,
    next_send: Instant,
}

impl Worker {
    /// Waits for the next request's turn. Returns the instant its latency counts from —
    /// its scheduled send time with `--rate`, else now — or `None` past the deadline.
    async fn turn(&mut self) -> Option<Instant> {
        let started = match self.interval {
            Some(interval) => {
                self.next_send += interval;
                tokio::time::sleep_until(self.next_send.into()).await;
                self.next_send
            }
            None => Instant::now(),
        };
        (Instant::now() < self.plan.deadline).then_some(started)
    }

    /// The turn of a traffic request, now and then after an analyst's read (in a turn
    /// of its own).
    async fn turn_after_read(&mut self) -> Option<Instant> {
        if self.rng.chance(self.plan.args.read) {
            let started = self.turn().await?;
            self.read_once(started).await;
        }
        let started = self.turn().await?;
        self.plan.sent.fetch_add(1, Ordering::Relaxed);
        Some(started)
    }

    async fn read_once(&mut self, started: Instant) {
        let customer = self.plan.customer_base + self.rng.below(self.plan.args.customers) as i64;
        let query = match self.rng.below(4) {
            0 => "/data/?pageSize=100".to_owned(),
            1 => "/data/?language=en&pageSize=100".to_owned(),
            2 => format!("/data/?customerId={customer}"),
            _ => format!("/data/?cursor=&customerId={customer}&language=de"),
        };
        self.plan.sent.fetch_add(1, Ordering::Relaxed);
        let mut tally = Tally::default();
        let answer = self.client.get(&query, &mut tally).await;
        self.record.note(Endpoint::Read, started, answer.map(|a| a.0), &tally);
    }

    fn new_dialog(&mut self) -> Dialog {
        let args = &self.plan.args;
        let rng = &mut self.rng;
        let hot = (args.customers / 10).max(1);
        let id = self.plan.dialog_base + self.plan.next_dialog.fetch_add(1, Ordering::Relaxed) as i64;
        let customer = self.plan.customer_base
            + if rng.chance(0.5) {
                rng.below(hot)
            } else {
                rng.below(args.customers)
            } as i64;
        let fate = if rng.chance(args.grant) {
            Fate::Granted
        } else if rng.chance(args.refuse / (1.0 - args.grant).max(f64::EPSILON)) {
            Fate::Refused
        } else {
            Fate::Undecided
        };
        let messages = 1 + rng.below(2 * args.messages.max(1));
        let after_grant = fate == Fate::Granted && rng.below(2) == 1;
        Dialog {
            id,
            customer,
            fate,
            messages,
            after_grant,
            queued: 0,
            sent: 0,
            decided: false,
            decision: None,
            acked: BTreeMap::new(),
        }
    }

    /// Sends `messages` — one POST, or one batch — and returns each one's result.
    async fn ingest(&mut self, messages: &[Message], started: Instant) -> Vec<Option<Staged>> {
        let mut tally = Tally::default();
        if let [message] = messages
            && self.plan.args.batch == 1
        {
            let body = json!({"text": message.text(), "language": message.language(), "messageId": message.id});
            let path = format!("/data/{}/{}", message.customer, message.dialog);
            let answer = self.client.post(&path, &body, &mut tally).await;
            self.record
                .note(Endpoint::Ingest, started, answer.as_ref().map(|a| a.0), &tally);
            return vec![answer.map(|(status, reply)| Staged::of(status, &reply))];
        }
        let items: Vec<Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "customerId": m.customer,
                    "dialogId": m.dialog,
                    "text": m.text(),
                    "language": m.language(),
                    "messageId": m.id,
                })
            })
            .collect();
        let (status, results) = self.client.batch(&items, &mut tally).await;
        let stats = self.record.note(Endpoint::Batch, started, status, &tally);
        for result in results.iter().flatten() {
            *stats.item_statuses.entry(result.status).or_default() += 1;
        }
        results
    }

    /// Sends the dialog's decision; whether it was answered as done.
    async fn decide(&mut self, dialog: &Dialog, started: Instant) -> bool {
        let approved = dialog.fate == Fate::Granted;
        let mut tally = Tally::default();
        let answer = self
            .client
            .post(
                &format!("/consents/{}", dialog.id),
                &json!({ "approved": approved }),
                &mut tally,
            )
            .await;
        let endpoint = if approved { Endpoint::Grant } else { Endpoint::Refuse };
        let status = answer.map(|a| a.0);
        self.record.note(endpoint, started, status, &tally);
        matches!(status, Some(200 | 202))
    }

    async fn run(mut self) -> Record {
        let batch = usize::try_from(self.plan.args.batch).unwrap_or(1);
        // Dialogs in play; the one whose messages before the decision are not all
        // queued yet; granted dialogs whose message after the grant waits for a request.
        let mut live: HashMap<i64, Dialog> = HashMap::new();
        let mut filling: Option<i64> = None;
        let mut after_grant: VecDeque<i64> = VecDeque::new();
        'run: loop {
            let mut messages: Vec<Message> = Vec::with_capacity(batch);
            while messages.len() < batch {
                if let Some(id) = after_grant.pop_front() {
                    if let Some(dialog) = live.get(&id) {
                        messages.push(Message::new(&self.plan, dialog, dialog.messages + 1));
                    }
                    continue;
                }
                let id = match filling {
                    Some(id) => id,
                    None => {
                        let dialog = self.new_dialog();
                        let id = dialog.id;
                        live.insert(id, dialog);
                        filling = Some(id);
                        id
                    }
                };
                let Some(dialog) = live.get_mut(&id) else {
                    filling = None;
                    continue;
                };
                messages.push(Message::new(&self.plan, dialog, dialog.queued));
                dialog.queued += 1;
                if dialog.queued == dialog.messages {
                    filling = None;
                }
            }
            let Some(started) = self.turn_after_read().await else {
                break;
            };
            let results = self.ingest(&messages, started).await;
            let answered = Instant::now();
            let mut staged = 0;
            for (message, result) in messages.iter().zip(&results) {
                let Some(dialog) = live.get_mut(&message.dialog) else {
                    continue;
                };
                dialog.sent += 1;
                if let Some(Staged { seq: Some(seq), .. }) = result {
                    dialog.acked.insert(
                        *seq,
                        Acked {
                            id: message.id.clone(),
                            sent: started,
                            at: answered,
                        },
                    );
                    staged += 1;
                    self.plan.posted_for(dialog.customer);
                }
            }
            let duplicates = results
                .iter()
                .flatten()
                .filter(|r| r.seq.is_some() && r.duplicate)
                .count() as u64;
            let endpoint = if self.plan.args.batch == 1 {
                Endpoint::Ingest
            } else {
                Endpoint::Batch
            };
            if let Some(stats) = self.record.endpoints.get_mut(&endpoint) {
                stats.messages += staged;
                stats.duplicates += duplicates;
            }
            self.plan.staged.fetch_add(staged, Ordering::Relaxed);
            // The dialogs whose last message (before or after the decision) this was.
            for message in &messages {
                let Some(dialog) = live.remove(&message.dialog) else {
                    continue;
                };
                if message.step + 1 < dialog.messages {
                    // More of its messages follow.
                    live.insert(dialog.id, dialog);
                    continue;
                }
                if message.step + 1 > dialog.messages || dialog.fate == Fate::Undecided {
                    // The message after its grant, or the last of an undecided dialog.
                    self.record.dialogs.insert(dialog.id, dialog.outcome());
                    continue;
                }
                let Some(started) = self.turn_after_read().await else {
                    live.insert(dialog.id, dialog);
                    break 'run;
                };
                let mut dialog = dialog;
                if !self.decide(&dialog, started).await {
                    // The decision is unknown: leave the dialog out of the check.
                    continue;
                }
                dialog.decided = true;
                dialog.decision = Some((started, Instant::now()));
                if dialog.fate == Fate::Granted
                    && let Some(&last) = dialog.acked.keys().next_back()
                    && self.rng.chance(self.plan.args.probe)
                {
                    self.probes.spawn(probe(
                        self.plan.clone(),
                        self.client.clone(),
                        dialog.customer,
                        dialog.id,
                        last,
                        Instant::now(),
                    ));
                }
                if dialog.after_grant {
                    after_grant.push_back(dialog.id);
                    live.insert(dialog.id, dialog);
                } else {
                    self.record.dialogs.insert(dialog.id, dialog.outcome());
                }
            }
        }
        // The deadline: what was sent of the dialogs in play is checked too.
        for dialog in live.into_values() {
            if dialog.sent > 0 {
                self.record.dialogs.insert(dialog.id, dialog.outcome());
            }
        }
        while self.probes.join_next().await.is_some() {}
        self.record
    }
}

/// Runs worker `index` until the deadline; returns what it saw.
pub(crate) async fn worker(plan: Arc<Plan>, client: Arc<Client>, index: usize) -> Record {
    let interval =
        (plan.args.rate > 0).then(|| Duration::from_secs_f64(plan.args.concurrency as f64 / plan.args.rate as f64));
    Worker {
        rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)),
        plan,
        client,
        record: Record::new(),
        probes: tokio::task::JoinSet::new(),
        interval,
        next_send: Instant::now(),
    }
    .run()
    .await
}

/// Polls until `seq` of `dialog` is readable; records the time since `granted`.
async fn probe(plan: Arc<Plan>, client: Arc<Client>, customer: i64, dialog: i64, seq: i64, granted: Instant) {
    let url = client.url(&format!("/data/?customerId={customer}&pageSize=1000"));
    while granted.elapsed() < Duration::from_secs(10) {
        if let Reply::Answer(200, page) = client.once(&url, None, PATIENT).await {
            let found = page["results"].as_array().is_some_and(|results| {
                results
                    .iter()
                    .any(|m| m["dialogId"].as_i64() == Some(dialog) && m["seq"].as_i64() == Some(seq))
            });
            if found {
                let micros = u64::try_from(granted.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut histogram) = plan.visibility.lock() {
                    let _ = histogram.record(micros.clamp(1, 60_000_000));
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if plan.erased.lock().is_ok_and(|erased| erased.contains(&customer)) {
        // Its customer's erasure may have taken it.
        return;
    }
    plan.invisible.fetch_add(1, Ordering::Relaxed);
}

/// A small, fast, deterministic-per-worker generator (xorshift64*).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}
