//! consent.lua: records a decision.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{array, bytes, decision_letter, eval, grant_to_audit, number, text};
use crate::domain::{CustomerId, Decision, DialogId, GrantedDialog};
use crate::staging::{Choice, Decided, Keyspace, Recorded, Revival, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/consent.lua")));

/// ARGV 4 when the dialog may belong to any customer.
const ANY_CUSTOMER: &str = "";
/// ARGV 7 when PostgreSQL holds no decision of the dialog to revive.
const NOTHING_HELD: &str = "";
/// The statuses of the reply.
const RECORDED: &[u8] = b"recorded";
const UNKNOWN: &[u8] = b"unknown";
const OTHER_CUSTOMER: &[u8] = b"other-customer";
/// The reply's `aside`.
const SET_ASIDE: &[u8] = b"set-aside";
const AS_FOUND: &[u8] = b"as-found";

/// The call: KEYS 1 meta, 2 msgs, 3 flush stream, 4 quarantined msgs, 5 quarantined
/// meta, 6 the shard's quarantine index; ARGV 1 dialog id, 2 the decision, 3 ttl (ms),
/// 4 the customer it must belong to (or [`ANY_CUSTOMER`]), then only with a revival:
/// 5 its customer, 6 its last seq, 7 the decision PostgreSQL holds (or [`NOTHING_HELD`]).
#[derive(Debug, Clone, Copy)]
pub struct Decide {
    pub dialog: DialogId,
    pub choice: Choice,
    pub ttl_ms: u64,
    pub revival: Option<Revival>,
    pub only_for: Option<CustomerId>,
}

impl Decide {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let d = self.dialog.get();
        let mut cmd = eval(&SCRIPT, 6);
        cmd.arg(keys.meta(d))
            .arg(keys.msgs(d))
            .arg(keys.flush_stream_of(d))
            .arg(keys.quarantined_msgs(d))
            .arg(keys.quarantined_meta(d))
            .arg(keys.quarantine_index(Keyspace::shard_of(d)))
            .arg(d)
            .arg(decision_letter(match self.choice {
                Choice::Grant => Decision::Granted,
                Choice::Refuse => Decision::Refused,
            }))
            .arg(self.ttl_ms);
        match self.only_for {
            Some(customer) => cmd.arg(customer.get()),
            None => cmd.arg(ANY_CUSTOMER),
        };
        match self.revival {
            Some(Revival::Granted(GrantedDialog { customer, last_seq })) => {
                cmd.arg(customer.get())
                    .arg(last_seq)
                    .arg(decision_letter(Decision::Granted));
            }
            Some(Revival::Refused { customer }) => {
                cmd.arg(customer.get()).arg(0).arg(decision_letter(Decision::Refused));
            }
            Some(Revival::Unheld { customer }) => {
                cmd.arg(customer.get()).arg(0).arg(NOTHING_HELD);
            }
            None => {}
        }
        cmd
    }
}

/// What the call did, and whether it found the dialog's meta of a type dapi does not
/// write there (then removed by a refusal, set aside by a grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub decided: Decided,
    pub set_aside: bool,
}

/// The reply: `{status, aside, ...}`; after [`RECORDED`]: epoch, customer, decided-at
/// (µs), the erased seqs and, for a refusal, the grant awaiting its audit event (absent:
/// none).
pub fn decode(reply: Value) -> Result<Reply, StagingError> {
    let corrupt = || StagingError::Corrupt("consent reply");
    let items = array(reply, "consent reply")?;
    let (Some(status), Some(aside)) = (items.first().and_then(bytes), items.get(1).and_then(bytes)) else {
        return Err(corrupt());
    };
    let set_aside = match aside {
        SET_ASIDE => true,
        AS_FOUND => false,
        _ => return Err(corrupt()),
    };
    let decided = match (status, &items[2..]) {
        (UNKNOWN, []) => Decided::Unknown,
        (OTHER_CUSTOMER, []) => Decided::OtherCustomer,
        (RECORDED, [epoch, customer, decided_at, erased, unaudited @ ..]) => {
            let unwritten_grant = match unaudited {
                [] => None,
                [grant] => Some(bytes(grant).and_then(grant_to_audit).ok_or_else(corrupt)?),
                _ => return Err(corrupt()),
            };
            let Value::Array(erased) = erased else {
                return Err(corrupt());
            };
            Decided::Recorded(Recorded {
                epoch: number(epoch).ok_or_else(corrupt)?,
                customer: CustomerId::from_stored(number(customer).ok_or_else(corrupt)?),
                decided_at_us: number(decided_at).ok_or_else(corrupt)?,
                unwritten_grant,
                erased_staged: erased
                    .iter()
                    .map(|seq| text(seq).and_then(|s| s.parse().ok()))
                    .collect::<Option<_>>()
                    .ok_or_else(corrupt)?,
            })
        }
        _ => return Err(corrupt()),
    };
    Ok(Reply { decided, set_aside })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::GrantToAudit;
    use crate::staging::wire::test_support::{bulk, words};

    fn keys_of(keys: &Keyspace, d: i64) -> Vec<String> {
        vec![
            "6".into(),
            keys.meta(d),
            keys.msgs(d),
            keys.flush_stream_of(d),
            keys.quarantined_msgs(d),
            keys.quarantined_meta(d),
            keys.quarantine_index(Keyspace::shard_of(d)),
        ]
    }

    #[test]
    fn a_decision_names_what_it_records_and_a_revival_comes_only_when_given() {
        let keys = Keyspace::new("t");
        let grant = Decide {
            dialog: DialogId::from_stored(7),
            choice: Choice::Grant,
            ttl_ms: 1000,
            revival: None,
            only_for: None,
        };
        let mut want = keys_of(&keys, 7);
        want.extend(["7", "g", "1000", ""].map(String::from));
        assert_eq!(words(&grant.command(&keys)), want);

        let refusal = Decide {
            choice: Choice::Refuse,
            revival: Some(Revival::Unheld {
                customer: CustomerId::UNKNOWN,
            }),
            only_for: Some(CustomerId::from_stored(3)),
            ..grant
        };
        let mut want = keys_of(&keys, 7);
        want.extend(["7", "r", "1000", "3", "-1", "0", ""].map(String::from));
        assert_eq!(words(&refusal.command(&keys)), want);

        let revived = Decide {
            revival: Some(Revival::Granted(GrantedDialog {
                customer: CustomerId::from_stored(3),
                last_seq: 12,
            })),
            ..grant
        };
        let mut want = keys_of(&keys, 7);
        want.extend(["7", "g", "1000", "", "3", "12", "g"].map(String::from));
        assert_eq!(words(&revived.command(&keys)), want);
    }

    #[test]
    fn consent_answers_decode_to_what_was_decided_and_anything_else_is_corrupt() {
        let recorded = |tail: Vec<Value>| {
            let mut items = vec![
                bulk("recorded"),
                bulk("as-found"),
                Value::Int(50),
                bulk("3"),
                bulk("60"),
                Value::Array(vec![bulk("1"), bulk("2")]),
            ];
            items.extend(tail);
            Value::Array(items)
        };
        let want = |unwritten_grant| Reply {
            decided: Decided::Recorded(Recorded {
                epoch: 50,
                customer: CustomerId::from_stored(3),
                decided_at_us: 60,
                unwritten_grant,
                erased_staged: vec![1, 2],
            }),
            set_aside: false,
        };
        assert_eq!(decode(recorded(vec![])).unwrap(), want(None));
        assert_eq!(
            decode(recorded(vec![bulk("40:41")])).unwrap(),
            want(Some(GrantToAudit {
                epoch: 40,
                decided_at_us: 41
            }))
        );
        assert_eq!(
            decode(Value::Array(vec![bulk("unknown"), bulk("set-aside")])).unwrap(),
            Reply {
                decided: Decided::Unknown,
                set_aside: true
            }
        );
        assert_eq!(
            decode(Value::Array(vec![bulk("other-customer"), bulk("as-found")])).unwrap(),
            Reply {
                decided: Decided::OtherCustomer,
                set_aside: false
            }
        );
        for corrupt in [
            Value::Int(1),
            Value::Array(vec![bulk("ok"), bulk("as-found")]),
            Value::Array(vec![bulk("unknown"), bulk("")]),
            Value::Array(vec![bulk("unknown"), bulk("as-found"), Value::Int(0)]),
            Value::Array(vec![bulk("recorded"), bulk("as-found"), Value::Int(50)]),
            recorded(vec![bulk("not a grant")]),
        ] {
            assert!(
                matches!(decode(corrupt.clone()), Err(StagingError::Corrupt(_))),
                "{corrupt:?}"
            );
        }
    }
}
