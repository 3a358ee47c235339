//! settle.lua: an unverified dialog settled with what PostgreSQL holds of it.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{bytes, eval};
use crate::domain::{DialogId, GrantedDialog};
use crate::staging::{InStore, Keyspace, Settled, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/settle.lua")));

/// What PostgreSQL holds ([`InStore`]): settle.lua's words.
const GRANT: &str = "grant";
const REFUSAL: &str = "refusal";
const NOTHING: &str = "nothing";
/// The reply: settle.lua's words.
const SETTLED: &[u8] = b"settled";
const NOTHING_TO_SETTLE: &[u8] = b"nothing-to-settle";
const OTHER_CUSTOMER: &[u8] = b"other-customer";
const MALFORMED: &[u8] = b"malformed";

/// The call: KEYS 1 meta, 2 msgs, 3 ids; ARGV 1 ttl (ms), 2 what PostgreSQL holds, then
/// for a grant or a refusal its customer, and for a grant its last seq.
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    pub dialog: DialogId,
    pub held: InStore,
    pub ttl_ms: u64,
}

impl Settle {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let d = self.dialog.get();
        let mut cmd = eval(&SCRIPT, 3);
        cmd.arg(keys.meta(d))
            .arg(keys.msgs(d))
            .arg(keys.ids(d))
            .arg(self.ttl_ms);
        match self.held {
            InStore::Granted(GrantedDialog { customer, last_seq }) => cmd.arg(GRANT).arg(customer.get()).arg(last_seq),
            InStore::Refused { customer } => cmd.arg(REFUSAL).arg(customer.get()),
            InStore::Nothing => cmd.arg(NOTHING),
        };
        cmd
    }
}

pub fn decode(reply: &Value) -> Result<Settled, StagingError> {
    match bytes(reply) {
        Some(SETTLED) => Ok(Settled::Done),
        Some(NOTHING_TO_SETTLE) => Ok(Settled::NothingToSettle),
        Some(OTHER_CUSTOMER) => Ok(Settled::CustomerDiffers),
        Some(MALFORMED) => Ok(Settled::Malformed),
        _ => Err(StagingError::Corrupt("settle reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CustomerId;
    use crate::staging::wire::test_support::{bulk, words};

    #[test]
    fn what_postgresql_holds_is_named_with_only_what_it_needs() {
        let keys = Keyspace::new("t");
        let customer = CustomerId::from_stored(3);
        let call = |held| {
            let words = words(
                &Settle {
                    dialog: DialogId::from_stored(7),
                    held,
                    ttl_ms: 1000,
                }
                .command(&keys),
            );
            assert_eq!(words[..5], ["3", &keys.meta(7), &keys.msgs(7), &keys.ids(7), "1000"]);
            words[5..].to_vec()
        };
        assert_eq!(
            call(InStore::Granted(GrantedDialog { customer, last_seq: 9 })),
            ["grant", "3", "9"]
        );
        assert_eq!(call(InStore::Refused { customer }), ["refusal", "3"]);
        assert_eq!(call(InStore::Nothing), ["nothing"]);
    }

    #[test]
    fn settle_answers_decode_to_how_it_went_and_anything_else_is_corrupt() {
        assert_eq!(decode(&bulk("settled")).unwrap(), Settled::Done);
        assert_eq!(decode(&bulk("nothing-to-settle")).unwrap(), Settled::NothingToSettle);
        assert_eq!(decode(&bulk("other-customer")).unwrap(), Settled::CustomerDiffers);
        assert_eq!(decode(&bulk("malformed")).unwrap(), Settled::Malformed);
        for corrupt in [Value::Int(1), Value::Int(-1), bulk(""), Value::Nil] {
            assert!(matches!(decode(&corrupt), Err(StagingError::Corrupt(_))), "{corrupt:?}");
        }
    }
}
