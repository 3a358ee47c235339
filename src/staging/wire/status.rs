//! status.lua: where a dialog stands in Redis.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{bytes, decision_of, eval, number, text};
use crate::domain::{CustomerId, DialogId};
use crate::staging::{Keyspace, StagedStatus, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/status.lua")));

/// The call: KEYS 1 meta, 2 msgs; no ARGV.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    pub dialog: DialogId,
}

impl Status {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let d = self.dialog.get();
        let mut cmd = eval(&SCRIPT, 2);
        cmd.arg(keys.meta(d)).arg(keys.msgs(d));
        cmd
    }
}

/// The reply: `{customer, decision, decided-at (µs), {seqs}}`, or `{}` when Redis does not
/// know the dialog. A customer or decision dapi does not write reads as not known (the
/// dialog is then as if Redis had forgotten it, as for keys of a wrong type); a missing
/// decision time as 0.
pub fn decode(reply: Value) -> Result<Option<StagedStatus>, StagingError> {
    let items = super::array(reply, "status reply")?;
    let [customer, decision, at, seqs] = items.as_slice() else {
        return Ok(None);
    };
    let (Some(customer), Some(decision)) = (number(customer), bytes(decision).and_then(decision_of)) else {
        return Ok(None);
    };
    let staged = match seqs {
        Value::Array(items) => items.iter().filter_map(|v| text(v)?.parse().ok()).collect(),
        _ => Vec::new(),
    };
    Ok(Some(StagedStatus {
        customer: CustomerId::from_stored(customer),
        decision,
        decided_at_us: number(at).unwrap_or_default(),
        staged,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Decision;
    use crate::staging::wire::test_support::{bulk, words};

    #[test]
    fn the_call_names_the_dialogs_meta_and_messages() {
        let keys = Keyspace::new("t");
        let cmd = Status {
            dialog: DialogId::from_stored(7),
        }
        .command(&keys);
        assert_eq!(words(&cmd), ["2", &keys.meta(7), &keys.msgs(7)]);
    }

    #[test]
    fn a_known_dialog_reads_as_its_status_and_anything_else_as_unknown() {
        let reply = Value::Array(vec![
            bulk("3"),
            bulk("g"),
            bulk("99"),
            Value::Array(vec![bulk("4"), bulk("5")]),
        ]);
        assert_eq!(
            decode(reply).unwrap(),
            Some(StagedStatus {
                customer: CustomerId::from_stored(3),
                decision: Decision::Granted,
                decided_at_us: 99,
                staged: vec![4, 5],
            })
        );
        assert_eq!(decode(Value::Array(vec![])).unwrap(), None);
        let odd = Value::Array(vec![bulk("3"), bulk("?"), bulk("99"), Value::Array(vec![])]);
        assert_eq!(decode(odd).unwrap(), None);
        assert!(matches!(decode(Value::Int(1)), Err(StagingError::Corrupt(_))));
    }
}
