//! Decisions (POST /consents/{dialogId}, and the refusals of an erasure): consent.lua.

use super::wire::{self, consent::Decide};
use super::{Keyspace, Staging, StagingError};
use crate::domain::{CustomerId, Decision, DialogId, GrantToAudit};

/// The decision [`Staging::decide`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Grant,
    Refuse,
}

impl Choice {
    /// A client's `approved`.
    pub fn approved(approved: bool) -> Self {
        if approved { Choice::Grant } else { Choice::Refuse }
    }
}

/// A decision as recorded in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub epoch: i64,
    pub customer: CustomerId,
    pub decided_at_us: i64,
    /// A grant whose audit event no flush has written yet (a refusal overtook it).
    pub unwritten_grant: Option<GrantToAudit>,
    /// The seqs of the staged (and quarantined) messages a refusal deleted.
    pub erased_staged: Vec<i64>,
}

/// How to bring back a dialog Redis no longer knows but PostgreSQL does.
#[derive(Debug, Clone, Copy)]
pub struct Revival {
    /// [`CustomerId::UNKNOWN`] for a refusal of a dialog whose customer PostgreSQL could
    /// not tell.
    pub customer: CustomerId,
    pub last_seq: i64,
    /// The decision PostgreSQL holds (`None`: none, as for a refusal recorded while
    /// PostgreSQL could not be asked): the standing one a new decision is compared with.
    pub standing: Option<Decision>,
}

/// What [`Staging::decide`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    Recorded(Recorded),
    /// Redis does not know the dialog and no revival was given: nothing recorded.
    Unknown,
    /// The dialog belongs to another customer than the one the call named: nothing
    /// recorded.
    OtherCustomer,
}

impl Staging {
    /// Records a decision. With a `revival`, a dialog Redis knows nothing of is
    /// re-created from it first; with `only_for`, a dialog of another customer is left
    /// alone.
    pub async fn decide(
        &self,
        dialog: DialogId,
        choice: Choice,
        revival: Option<Revival>,
        only_for: Option<CustomerId>,
    ) -> Result<Decided, StagingError> {
        let call = Decide {
            dialog,
            choice,
            ttl_ms: self.ttl_ms,
            revival,
            only_for,
        };
        let reply = self
            .run_acknowledged(
                Keyspace::shard_of(dialog.get()),
                &wire::consent::SCRIPT,
                &call.command(&self.keys),
            )
            .await?;
        let reply = wire::consent::decode(reply)?;
        if reply.set_aside {
            metrics::counter!(crate::telemetry::REQUEST_QUARANTINED).increment(1);
            tracing::error!(
                dialog = dialog.get(),
                "a decision found the dialog's state in Redis of a type dapi does not write there: a refusal \
                 removed it, a grant set it aside (docs/operations.md, \"Quarantine\")"
            );
        }
        Ok(reply.decided)
    }
}
