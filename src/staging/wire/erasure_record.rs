//! erasure_record.lua, and the hash it writes: the erasures PostgreSQL could not record
//! (it was away), kept in Redis until it can.
//!
//! The hash holds each record twice: `c<customer>` → `<erasure id> <requested-at µs>`
//! (one per customer: a repeated DELETE finds it) and `e<erasure id>` →
//! `<customer> <requested-at µs>` (GET /erasures/{id} finds it).

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::domain::CustomerId;
use crate::staging::{ErasureRecord, Keyspace, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/erasure_record.lua")));

/// The call: KEYS 1 the records; ARGV 1 customer, 2 a new erasure id, 3 now (µs).
#[derive(Debug, Clone, Copy)]
pub struct RecordErasure {
    pub customer: CustomerId,
    pub erasure_id: uuid::Uuid,
    pub now_us: i64,
}

impl RecordErasure {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 1);
        cmd.arg(keys.erasure_records())
            .arg(self.customer.get())
            .arg(self.erasure_id.hyphenated().to_string())
            .arg(self.now_us);
        cmd
    }

    /// The reply: the customer's record, `<erasure id> <requested-at µs>` (a new one, or
    /// the one recorded already).
    pub fn decode(&self, reply: &str) -> Result<ErasureRecord, StagingError> {
        by_customer(self.customer, reply).ok_or(StagingError::Corrupt("erasure record"))
    }
}

/// The field of a customer's record.
pub fn customer_field(customer: CustomerId) -> String {
    format!("c{}", customer.get())
}

/// The field of an erasure's record.
pub fn erasure_field(id: uuid::Uuid) -> String {
    format!("e{}", id.hyphenated())
}

/// A customer's record, `<erasure id> <requested-at µs>`.
pub fn by_customer(customer: CustomerId, raw: &str) -> Option<ErasureRecord> {
    let (id, at) = raw.split_once(' ')?;
    Some(ErasureRecord {
        customer,
        erasure_id: uuid::Uuid::parse_str(id).ok()?,
        requested_at_us: at.parse().ok()?,
    })
}

/// An erasure's record, `<customer> <requested-at µs>`.
pub fn by_erasure(erasure_id: uuid::Uuid, raw: &str) -> Option<ErasureRecord> {
    let (customer, at) = raw.split_once(' ')?;
    Some(ErasureRecord {
        customer: CustomerId::from_stored(customer.parse().ok()?),
        erasure_id,
        requested_at_us: at.parse().ok()?,
    })
}

/// Every record in the hash (`HGETALL`), read by their customers' fields.
pub fn all(fields: &[(String, String)]) -> Vec<ErasureRecord> {
    fields
        .iter()
        .filter_map(|(field, value)| {
            let customer = CustomerId::from_stored(field.strip_prefix('c')?.parse().ok()?);
            by_customer(customer, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::wire::test_support::words;

    const ID: &str = "0190f2a4-7b7c-7cc0-8a44-9e1f5d8b2c3a";

    #[test]
    fn the_call_names_customer_erasure_and_time() {
        let keys = Keyspace::new("t");
        let call = RecordErasure {
            customer: CustomerId::from_stored(5),
            erasure_id: uuid::Uuid::parse_str(ID).unwrap(),
            now_us: 77,
        };
        assert_eq!(
            words(&call.command(&keys)),
            ["1", &keys.erasure_records(), "5", ID, "77"]
        );
        assert_eq!(
            call.decode(&format!("{ID} 70")).unwrap(),
            ErasureRecord {
                customer: CustomerId::from_stored(5),
                erasure_id: uuid::Uuid::parse_str(ID).unwrap(),
                requested_at_us: 70,
            }
        );
        for corrupt in ["", ID, "nope 70", &format!("{ID} x")] {
            assert!(
                matches!(call.decode(corrupt), Err(StagingError::Corrupt(_))),
                "{corrupt}"
            );
        }
    }

    #[test]
    fn both_fields_of_a_record_read_back_to_it() {
        let id = uuid::Uuid::parse_str(ID).unwrap();
        let record = ErasureRecord {
            customer: CustomerId::from_stored(5),
            erasure_id: id,
            requested_at_us: 70,
        };
        assert_eq!(customer_field(record.customer), "c5");
        assert_eq!(erasure_field(id), format!("e{ID}"));
        assert_eq!(by_erasure(id, "5 70"), Some(record));
        assert_eq!(by_erasure(id, "x 70"), None);
        let fields = [
            (customer_field(record.customer), format!("{ID} 70")),
            (erasure_field(id), "5 70".to_owned()),
        ];
        assert_eq!(all(&fields), [record]);
    }
}
