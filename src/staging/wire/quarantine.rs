//! quarantine.lua: a dialog the flusher cannot read, set aside.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{bytes, eval};
use crate::domain::DialogId;
use crate::staging::{Keyspace, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/quarantine.lua")));

/// What to set aside: quarantine.lua's words.
const MESSAGES_ONLY: &str = "messages-only";
const WHOLE_DIALOG: &str = "whole-dialog";
/// The reply: quarantine.lua's words.
const MOVED: &[u8] = b"moved";
const NOTHING_MOVED: &[u8] = b"nothing-moved";

/// The call: KEYS 1 meta, 2 msgs, 3 quarantined meta, 4 quarantined msgs, 5 the shard's
/// quarantine index; ARGV 1 dialog id, 2 reason, 3 what to set aside.
#[derive(Debug, Clone, Copy)]
pub struct Quarantine<'a> {
    pub dialog: DialogId,
    /// Why, for the quarantine index (never customer text).
    pub reason: &'a str,
    /// Only the messages; the meta (the decision) stays where ingest and consent find it.
    pub messages_only: bool,
}

impl Quarantine<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let d = self.dialog.get();
        let mut cmd = eval(&SCRIPT, 5);
        cmd.arg(keys.meta(d))
            .arg(keys.msgs(d))
            .arg(keys.quarantined_meta(d))
            .arg(keys.quarantined_msgs(d))
            .arg(keys.quarantine_index(Keyspace::shard_of(d)))
            .arg(d)
            .arg(self.reason)
            .arg(if self.messages_only {
                MESSAGES_ONLY
            } else {
                WHOLE_DIALOG
            });
        cmd
    }
}

/// The reply: whether anything moved.
pub fn decode(reply: &Value) -> Result<bool, StagingError> {
    match bytes(reply) {
        Some(MOVED) => Ok(true),
        Some(NOTHING_MOVED) => Ok(false),
        _ => Err(StagingError::Corrupt("quarantine reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::wire::test_support::{bulk, words};

    #[test]
    fn the_call_names_the_keys_the_reason_and_what_to_set_aside() {
        let keys = Keyspace::new("t");
        let call = |messages_only| {
            Quarantine {
                dialog: DialogId::from_stored(7),
                reason: "why",
                messages_only,
            }
            .command(&keys)
        };
        let mut want = vec![
            "5".to_owned(),
            keys.meta(7),
            keys.msgs(7),
            keys.quarantined_meta(7),
            keys.quarantined_msgs(7),
            keys.quarantine_index(Keyspace::shard_of(7)),
            "7".into(),
            "why".into(),
        ];
        want.push("messages-only".into());
        assert_eq!(words(&call(true)), want);
        want.pop();
        want.push("whole-dialog".into());
        assert_eq!(words(&call(false)), want);
        assert!(decode(&bulk("moved")).unwrap());
        assert!(!decode(&bulk("nothing-moved")).unwrap());
        assert!(matches!(decode(&Value::Int(1)), Err(StagingError::Corrupt(_))));
    }
}
