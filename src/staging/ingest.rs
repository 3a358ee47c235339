//! Staging messages (POST /data): ingest.lua, called with many messages at once, and
//! single messages together under load (`coalesce`).

use std::time::Duration;

use super::wire;
use super::{Keyspace, Shard, Staging, StagingError, by_slot_group, ttl_millis};
use crate::domain::{CustomerId, Decision, DialogId, IncomingMessage};

/// What became of a message offered to [`Staging::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Staged, or (`duplicate`) a repeat of a `messageId` already staged: then `seq` and
    /// `decision` are the first answer's, and nothing was stored.
    Accepted {
        seq: i64,
        decision: Decision,
        duplicate: bool,
    },
    CustomerMismatch,
    ConsentRefused,
    /// Redis does not know the dialog and was not told how to create it: nothing staged.
    Unknown,
    /// Keys of the dialog held a type dapi does not write there (a hand edit, a bug):
    /// they were set aside under their quarantine names, nothing was staged, and the
    /// dialog is now as if Redis had forgotten it.
    SetAside,
}

/// One message for [`Staging::stage`].
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub customer: CustomerId,
    pub dialog: DialogId,
    pub message: &'a IncomingMessage,
    pub create: Create,
}

/// How [`Staging::stage`] creates a dialog Redis does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Don't: answer [`IngestOutcome::Unknown`] so the caller can ask PostgreSQL first.
    Not,
    /// PostgreSQL holds no grant for it: a new pending dialog.
    New,
    /// PostgreSQL holds it as granted, its last stored seq given: granted again, its seq
    /// continuing. Only the seq of the [`crate::domain::GrantedDialog`]: the customer is
    /// the message's own ([`NewMessage::customer`]), which a grant of another customer's
    /// never reaches (it answers 409 first), so the script has one customer to trust.
    Revive { last_seq: i64 },
    /// PostgreSQL could not be asked: pending and unverified, for the flusher to settle.
    Unverified,
}

impl Staging {
    /// How long a `messageId` is remembered per dialog (`DAPI_IDEMPOTENCY_WINDOW`).
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window_ms = ttl_millis(window).max(1);
        self
    }

    /// Stages messages: one script call per slot group (one for everything on one Redis,
    /// one per shard on a cluster), the groups at once, an outcome per message, in order.
    /// `create` says, per message, what to do when Redis does not know its dialog (see
    /// the module's "Redis forgetting a dialog"). `Err` when nothing was staged; a group
    /// that failed while others were staged answers its messages with the error
    /// ([`StagingError::Interrupted`], or [`StagingError::NotReplicated`]). A single
    /// message goes in a call with the other single messages waiting (see `coalesce`).
    pub async fn stage(
        &self,
        messages: &[NewMessage<'_>],
    ) -> Result<Vec<Result<IngestOutcome, StagingError>>, StagingError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if let ([message], Some(coalescer)) = (messages, &self.coalescer) {
            let coalescer = coalescer.get_or_init(|| {
                super::coalesce::Coalescer::start(Staging {
                    coalescer: None,
                    ..self.clone()
                })
            });
            return Ok(vec![Ok(coalescer.stage(message).await?)]);
        }
        // One slot group (one Redis, or a single message): one call, nothing to sort.
        if !self.keys.is_cluster() || messages.len() == 1 {
            let shard = Keyspace::shard_of(messages[0].dialog.get());
            return Ok(self
                .stage_group(shard, messages.iter())
                .await?
                .into_iter()
                .map(Ok)
                .collect());
        }
        let groups = by_slot_group(&self.keys, messages, |m| m.dialog.get());
        let calls = groups.iter().map(|(_, members)| {
            let shard = Keyspace::shard_of(messages[members[0]].dialog.get());
            self.stage_group(shard, members.iter().map(|&i| &messages[i]))
        });
        let answers = futures_util::future::join_all(calls).await;
        if answers.iter().all(Result::is_err) {
            return Err(answers
                .into_iter()
                .find_map(Result::err)
                .unwrap_or(StagingError::Interrupted));
        }
        let mut outcomes: Vec<Option<Result<IngestOutcome, StagingError>>> = messages.iter().map(|_| None).collect();
        for ((_, members), answer) in groups.iter().zip(answers) {
            match answer {
                Ok(staged) => {
                    for (&i, outcome) in members.iter().zip(staged) {
                        outcomes[i] = Some(Ok(outcome));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::chain(&e), "Redis failed for part of a batch");
                    for &i in members {
                        outcomes[i] = Some(Err(match e {
                            StagingError::NotReplicated { acked, wanted } => {
                                StagingError::NotReplicated { acked, wanted }
                            }
                            _ => StagingError::Interrupted,
                        }));
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(StagingError::Corrupt("no outcome"))))
            .collect())
    }

    /// One script call for messages of one slot group (`shard`: any of its shards, for
    /// the replicas' confirmation).
    async fn stage_group<'m>(
        &self,
        shard: Shard,
        messages: impl ExactSizeIterator<Item = &'m NewMessage<'m>>,
    ) -> Result<Vec<IngestOutcome>, StagingError> {
        let messages: Vec<&NewMessage<'_>> = messages.collect();
        metrics::histogram!(crate::telemetry::INGEST_CALL_MESSAGES).record(messages.len() as f64);
        let call = wire::ingest::Stage {
            ttl_ms: self.ttl_ms,
            idempotency_window_ms: self.idempotency_window_ms,
            messages: &messages,
        };
        let reply: Vec<i64> = self
            .run_acknowledged(shard, &wire::ingest::SCRIPT, &call.command(&self.keys))
            .await?;
        call.decode(&reply)
    }
}
