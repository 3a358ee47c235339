//! What an erasure asks of Redis: the customer's staged dialogs (customer_dialogs.lua),
//! its record while PostgreSQL is away (erasure_record.lua and the hash it writes), and
//! the confirmation that lets a refused dialog's keys expire (finish.lua).

use super::wire::{self, customer_dialogs::CustomerDialogs, erasure_record::RecordErasure, finish::Finish};
use super::{Finished, Life, Staging, StagingError};
use crate::domain::{CustomerId, DialogId};

/// An erasure PostgreSQL could not record, kept in Redis until it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErasureRecord {
    pub customer: CustomerId,
    pub erasure_id: uuid::Uuid,
    pub requested_at_us: i64,
}

impl Staging {
    /// The dialogs Redis holds indexed under `customer`, in every shard (one script call
    /// per slot group, at once): the staged dialogs an erasure must refuse. A dialog may
    /// be named that belongs to another customer by now; [`Staging::decide`] with
    /// `only_for` leaves such a one alone.
    pub async fn customer_dialogs(&self, customer: CustomerId) -> Result<Vec<DialogId>, StagingError> {
        let calls = self.keys.shard_groups().into_iter().map(|shards| {
            let cmd = CustomerDialogs {
                customer,
                shards: &shards,
            }
            .command(&self.keys);
            let mut conn = self.conn.clone();
            async move {
                self.bounded(wire::run::<Vec<i64>>(&mut conn, &wire::customer_dialogs::SCRIPT, &cmd))
                    .await
            }
        });
        let mut dialogs = Vec::new();
        for found in futures_util::future::join_all(calls).await {
            dialogs.extend(wire::customer_dialogs::decode(found?));
        }
        dialogs.sort_unstable();
        dialogs.dedup();
        Ok(dialogs)
    }

    /// Records the erasure of `customer` in Redis (PostgreSQL being away), or finds the
    /// one recorded already.
    pub async fn record_erasure(
        &self,
        customer: CustomerId,
        erasure_id: uuid::Uuid,
        now_us: i64,
    ) -> Result<ErasureRecord, StagingError> {
        let call = RecordErasure {
            customer,
            erasure_id,
            now_us,
        };
        let mut conn = self.conn.clone();
        let record: String = self
            .bounded(wire::run(
                &mut conn,
                &wire::erasure_record::SCRIPT,
                &call.command(&self.keys),
            ))
            .await?;
        call.decode(&record)
    }

    /// The erasure recorded in Redis under `id`, if any.
    pub async fn erasure_record(&self, id: uuid::Uuid) -> Result<Option<ErasureRecord>, StagingError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = self
            .bounded(
                redis::cmd("HGET")
                    .arg(self.keys.erasure_records())
                    .arg(wire::erasure_record::erasure_field(id))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(raw.and_then(|raw| wire::erasure_record::by_erasure(id, &raw)))
    }

    /// Every erasure recorded in Redis.
    pub async fn erasure_records(&self) -> Result<Vec<ErasureRecord>, StagingError> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = self
            .bounded(
                redis::cmd("HGETALL")
                    .arg(self.keys.erasure_records())
                    .query_async(&mut conn),
            )
            .await?;
        Ok(wire::erasure_record::all(&all))
    }

    /// Forgets an erasure recorded in Redis (PostgreSQL holds it now).
    pub async fn forget_erasure_record(&self, record: &ErasureRecord) -> Result<(), StagingError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .bounded(
                redis::cmd("HDEL")
                    .arg(self.keys.erasure_records())
                    .arg(wire::erasure_record::customer_field(record.customer))
                    .arg(wire::erasure_record::erasure_field(record.erasure_id))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Tells Redis that PostgreSQL has applied the refusal recorded under `epoch`: the
    /// dialog stops waiting for its erasure and its keys start to expire (unless a newer
    /// refusal is waiting by now). finish.lua for one dialog, with nothing written and no
    /// entry to acknowledge.
    pub async fn confirm_erasure(&self, dialog: DialogId, epoch: i64) -> Result<(), StagingError> {
        let erased = Finished {
            dialog,
            life: Life::UNSTAMPED,
            written_up_to: None,
            read: 0,
            erased_refusal: Some(epoch),
            take_back: None,
        };
        let cmd = Finish {
            ttl_ms: self.ttl_ms,
            dialogs: &[&erased],
            entries: &[],
        }
        .command(&self.keys);
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(wire::run(&mut conn, &wire::finish::SCRIPT, &cmd)).await?;
        Ok(())
    }
}
