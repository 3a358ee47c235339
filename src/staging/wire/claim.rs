//! claim.lua: a batch's granted dialogs claimed before its PostgreSQL commit.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{eval, number};
use crate::staging::{Claim, Keyspace, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/claim.lua")));

/// The call: KEYS per dialog its meta; ARGV 1 ttl (ms), then per dialog its life stamp,
/// customer, epoch, the highest seq the batch writes and how many messages.
#[derive(Debug, Clone, Copy)]
pub struct ClaimSeqs<'a> {
    pub ttl_ms: u64,
    pub claims: &'a [&'a Claim<'a>],
}

impl ClaimSeqs<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, self.claims.len());
        for c in self.claims {
            cmd.arg(keys.meta(c.dialog.get()));
        }
        cmd.arg(self.ttl_ms);
        for c in self.claims {
            cmd.arg(c.life.wire())
                .arg(c.customer.get())
                .arg(c.epoch)
                .arg(c.last_seq)
                .arg(c.count);
        }
        cmd
    }

    /// The reply, per dialog in order: `None` (the script's KEEPS, a nil) when the batch
    /// keeps its seqs, else the seq after which its messages are renumbered.
    pub fn decode(&self, reply: Vec<Value>) -> Result<Vec<Option<i64>>, StagingError> {
        if reply.len() != self.claims.len() {
            return Err(StagingError::Corrupt("claim reply has the wrong length"));
        }
        reply
            .iter()
            .map(|item| match item {
                Value::Nil => Ok(None),
                other => number(other).map(Some).ok_or(StagingError::Corrupt("claim reply")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CustomerId, DialogId};
    use crate::staging::Life;
    use crate::staging::wire::test_support::words;

    #[test]
    fn each_claim_names_its_life_customer_epoch_and_seqs_and_the_reply_what_to_renumber() {
        let keys = Keyspace::new("t");
        let (stamped, unstamped) = (Life::stamped("40"), Life::UNSTAMPED);
        let claim = |d, life| Claim {
            dialog: DialogId::from_stored(d),
            life,
            customer: CustomerId::from_stored(3),
            epoch: 50,
            last_seq: 9,
            count: 2,
        };
        let claims = [claim(7, &stamped), claim(8, &unstamped)];
        let refs: Vec<&Claim<'_>> = claims.iter().collect();
        let call = ClaimSeqs {
            ttl_ms: 1000,
            claims: &refs,
        };
        assert_eq!(
            words(&call.command(&keys)),
            [
                "2",
                &keys.meta(7),
                &keys.meta(8),
                "1000",
                "40",
                "3",
                "50",
                "9",
                "2",
                "",
                "3",
                "50",
                "9",
                "2"
            ]
        );
        assert_eq!(call.decode(vec![Value::Nil, Value::Int(12)]).unwrap(), [None, Some(12)]);
        assert!(matches!(call.decode(vec![Value::Nil]), Err(StagingError::Corrupt(_))));
        assert!(matches!(
            call.decode(vec![Value::Nil, Value::Array(vec![])]),
            Err(StagingError::Corrupt(_))
        ));
    }
}
