//! snapshot.lua: the state of a batch's dialogs, read in one atomic step.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{bytes, decision_of, eval, grant_to_audit, message, number, text};
use crate::domain::{Audit, CustomerId, DialogId, DialogState, Refusal};
use crate::staging::{Keyspace, Life, Snapshot, StagingError, Unreadable};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/snapshot.lua")));

/// Stands for a dialog whose meta, or messages, are not of the type dapi writes.
const UNREADABLE: &[u8] = b"unreadable";
/// Meta's `u` of an unverified dialog.
const UNVERIFIED: &[u8] = b"1";

/// The call: KEYS per dialog its meta and msgs; ARGV 1 the most messages per dialog,
/// 2 the byte budget for all messages together.
#[derive(Debug, Clone, Copy)]
pub struct TakeSnapshot<'a> {
    pub dialogs: &'a [DialogId],
    pub max_messages: usize,
    pub byte_budget: usize,
}

impl TakeSnapshot<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 2 * self.dialogs.len());
        for d in self.dialogs {
            cmd.arg(keys.meta(d.get())).arg(keys.msgs(d.get()));
        }
        cmd.arg(self.max_messages).arg(self.byte_budget);
        cmd
    }

    /// The reply: one item per dialog, in order. Dialogs Redis no longer knows are left
    /// out; one dapi cannot read is [`Snapshot::Unreadable`], never an error.
    pub fn decode(&self, reply: Vec<Value>) -> Result<Vec<Snapshot>, StagingError> {
        if reply.len() != self.dialogs.len() {
            return Err(StagingError::Corrupt("snapshot reply has the wrong length"));
        }
        Ok(self
            .dialogs
            .iter()
            .zip(reply)
            .filter_map(|(&dialog, item)| decode_dialog(dialog, &item))
            .collect())
    }
}

/// One dialog: `{UNREADABLE}`, or meta's `{c, d, e, t, x, xt, u, messages, b, a, xs}`
/// (messages a list, or UNREADABLE). `None` when Redis no longer knows the dialog.
fn decode_dialog(dialog: DialogId, item: &Value) -> Option<Snapshot> {
    let unreadable = |reason, messages_only| {
        Some(Snapshot::Unreadable(Unreadable {
            dialog,
            reason,
            messages_only,
        }))
    };
    let Value::Array(fields) = item else {
        return unreadable("the snapshot answer has the wrong shape", false);
    };
    if let [marker] = fields.as_slice()
        && bytes(marker) == Some(UNREADABLE)
    {
        return unreadable("the dialog's meta is not a hash", false);
    }
    let [
        customer,
        decision,
        epoch,
        decided_at,
        refused,
        refused_at,
        unverified,
        messages,
        life,
        unwritten_grant,
        refusal_erased,
    ] = fields.as_slice()
    else {
        return unreadable("the snapshot answer has the wrong shape", false);
    };
    if matches!(customer, Value::Nil) && matches!(decision, Value::Nil) {
        return None; // forgotten (expired) dialog
    }
    let Some(customer) = number(customer) else {
        return unreadable("customer id is not a number", false);
    };
    let Some(decision) = bytes(decision).and_then(decision_of) else {
        return unreadable("decision is not one dapi writes", false);
    };
    let Some(epoch) = number(epoch) else {
        return unreadable("epoch is not a number", false);
    };
    if bytes(unverified) == Some(UNVERIFIED) {
        return Some(Snapshot::Unverified(dialog));
    }
    let unerased_refusal = match (refused, refused_at) {
        (Value::Nil, _) => None,
        (epoch, at) => match (number(epoch), number(at)) {
            (Some(epoch), Some(decided_at_us)) => Some(Refusal { epoch, decided_at_us }),
            _ => return unreadable("unerased refusal is not a number", false),
        },
    };
    let Value::Array(raw) = messages else {
        return unreadable("the staged messages are not a list", true);
    };
    let Some(messages) = raw
        .iter()
        .map(|m| bytes(m).and_then(message::decode))
        .collect::<Option<Vec<_>>>()
    else {
        return unreadable("a staged message does not decode", true);
    };
    let life = match life {
        Value::Nil => Life::UNSTAMPED,
        other => match text(other) {
            Some(stamp) => Life::stamped(stamp),
            None => return unreadable("life stamp is not text", false),
        },
    };
    let unwritten_grant = match unwritten_grant {
        Value::Nil => None,
        other => match bytes(other).and_then(grant_to_audit) {
            Some(grant) => Some(grant),
            None => return unreadable("the grant awaiting its audit event is not one dapi writes", false),
        },
    };
    Some(Snapshot::Ready(
        DialogState {
            audit: Audit {
                unwritten_grant,
                // The seqs the unerased refusal deleted from Redis (`xs`), for its audit
                // event's count when the flusher writes it.
                erased_staged: text(refusal_erased)
                    .map(|seqs| seqs.split(',').filter_map(|seq| seq.parse().ok()).collect())
                    .unwrap_or_default(),
            },
            dialog,
            customer: CustomerId::from_stored(customer),
            decision,
            epoch,
            decided_at_us: number(decided_at).unwrap_or_default(),
            unerased_refusal,
            messages,
        },
        life,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Decision, GrantToAudit};
    use crate::staging::wire::test_support::{bulk, words};

    fn dialog(fields: Vec<Value>) -> Value {
        Value::Array(fields)
    }

    fn granted(messages: Value) -> Vec<Value> {
        vec![
            bulk("3"),
            bulk("g"),
            bulk("50"),
            bulk("60"),
            Value::Nil,
            Value::Nil,
            Value::Nil,
            messages,
            bulk("40"),
            bulk("50:60"),
            Value::Nil,
        ]
    }

    #[test]
    fn the_call_names_each_dialogs_meta_and_messages_then_the_limits() {
        let keys = Keyspace::new("t");
        let dialogs = [DialogId::from_stored(7), DialogId::from_stored(8)];
        let call = TakeSnapshot {
            dialogs: &dialogs,
            max_messages: 100,
            byte_budget: 5000,
        };
        assert_eq!(
            words(&call.command(&keys)),
            [
                "4",
                &keys.meta(7),
                &keys.msgs(7),
                &keys.meta(8),
                &keys.msgs(8),
                "100",
                "5000"
            ]
        );
    }

    #[test]
    fn a_readable_dialog_decodes_to_its_state_and_life() {
        let d = DialogId::from_stored(7);
        let item = dialog(granted(Value::Array(vec![bulk("1:9:EN:hi")])));
        let Some(Snapshot::Ready(state, life)) = decode_dialog(d, &item) else {
            panic!("not ready");
        };
        assert_eq!(life, Life::stamped("40"));
        assert_eq!((state.dialog, state.customer), (d, CustomerId::from_stored(3)));
        assert_eq!(
            (state.decision, state.epoch, state.decided_at_us),
            (Decision::Granted, 50, 60)
        );
        assert_eq!(
            state.audit.unwritten_grant,
            Some(GrantToAudit {
                epoch: 50,
                decided_at_us: 60
            })
        );
        assert_eq!(state.unerased_refusal, None);
        assert_eq!(state.messages.len(), 1);
        assert_eq!(state.messages[0].text, "hi");

        let mut refused = granted(Value::Array(vec![]));
        refused[1] = bulk("r");
        refused[4] = bulk("55");
        refused[5] = bulk("56");
        refused[8] = Value::Nil;
        refused[9] = Value::Nil;
        refused[10] = bulk("2,3");
        let Some(Snapshot::Ready(state, life)) = decode_dialog(d, &dialog(refused)) else {
            panic!("not ready");
        };
        assert_eq!(life, Life::UNSTAMPED);
        assert_eq!(
            state.unerased_refusal,
            Some(Refusal {
                epoch: 55,
                decided_at_us: 56
            })
        );
        assert_eq!(state.audit.unwritten_grant, None);
        assert_eq!(state.audit.erased_staged, [2, 3]);
    }

    #[test]
    fn a_forgotten_dialog_is_left_out_and_an_unverified_one_named() {
        let d = DialogId::from_stored(7);
        let forgotten = vec![Value::Nil; 7]
            .into_iter()
            .chain([Value::Array(vec![]), Value::Nil, Value::Nil, Value::Nil])
            .collect();
        assert!(decode_dialog(d, &dialog(forgotten)).is_none());
        let mut unverified = granted(Value::Array(vec![]));
        unverified[6] = bulk("1");
        assert!(matches!(decode_dialog(d, &dialog(unverified)), Some(Snapshot::Unverified(x)) if x == d));
    }

    #[test]
    fn a_dialog_dapi_cannot_read_is_unreadable_not_an_error() {
        let d = DialogId::from_stored(7);
        let whole = |item: Value| match decode_dialog(d, &item) {
            Some(Snapshot::Unreadable(u)) => {
                assert_eq!(u.dialog, d);
                u.messages_only
            }
            other => panic!("not set aside: {other:?}"),
        };
        let mut odd_decision = granted(Value::Array(vec![]));
        odd_decision[1] = bulk("?");
        assert!(!whole(dialog(odd_decision)));
        assert!(!whole(dialog(vec![bulk("unreadable")])));
        assert!(!whole(dialog(vec![bulk("1"), bulk("g")])));
        assert!(!whole(Value::Int(1)));
        let mut odd_grant = granted(Value::Array(vec![]));
        odd_grant[9] = bulk("x");
        assert!(!whole(dialog(odd_grant)));
        assert!(whole(dialog(granted(bulk("unreadable")))));
        assert!(whole(dialog(granted(Value::Array(vec![bulk("no seq")])))));

        let call = TakeSnapshot {
            dialogs: &[d],
            max_messages: 1,
            byte_budget: 1,
        };
        assert!(matches!(call.decode(vec![]), Err(StagingError::Corrupt(_))));
    }
}
