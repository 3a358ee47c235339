//! Decisions (POST /consents/{dialogId}, and the refusals of an erasure): consent.lua.

use super::wire::{self, consent::Decide};
use super::{Keyspace, Staging, StagingError};
use crate::domain::{CustomerId, DialogId, GrantToAudit, GrantedDialog};

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

/// How to bring back a dialog Redis no longer knows but PostgreSQL does; what it says
/// PostgreSQL holds is the standing decision a new one is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revival {
    /// PostgreSQL holds a grant: back as granted, its seqs continuing.
    Granted(GrantedDialog),
    /// PostgreSQL holds a refusal of the customer's dialog; nothing of it is stored.
    Refused { customer: CustomerId },
    /// No standing decision: a refusal recorded while PostgreSQL could not be asked
    /// ([`CustomerId::UNKNOWN`] when it could not say whose the dialog is), or a customer
    /// erasure's refusal of a dialog PostgreSQL holds under the customer.
    Unheld { customer: CustomerId },
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
