//! Where a dialog stands in Redis (GET /consents/{dialogId}): status.lua.

use super::wire::{self, status::Status};
use super::{Staging, StagingError};
use crate::domain::{CustomerId, Decision, DialogId};

/// Where a dialog stands in Redis ([`Staging::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedStatus {
    pub customer: CustomerId,
    pub decision: Decision,
    /// When the latest decision was recorded (µs; for a pending dialog, its creation).
    pub decided_at_us: i64,
    /// The seqs of its staged messages, in order.
    pub staged: Vec<i64>,
}

impl Staging {
    /// Where `dialog` stands in Redis; `None` when Redis does not know it.
    pub async fn status(&self, dialog: DialogId) -> Result<Option<StagedStatus>, StagingError> {
        let cmd = Status { dialog }.command(&self.keys);
        let mut conn = self.conn.clone();
        let reply = self.bounded(wire::run(&mut conn, &wire::status::SCRIPT, &cmd)).await?;
        wire::status::decode(reply)
    }
}
