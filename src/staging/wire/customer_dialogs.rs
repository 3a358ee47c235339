//! customer_dialogs.lua: the dialogs indexed under one customer in a slot group's shards.

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::domain::{CustomerId, DialogId};
use crate::staging::{Keyspace, Shard};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/customer_dialogs.lua")));

/// The call: KEYS per shard of the group, the customer's bucket of its index and the
/// earlier layout's per-customer index; ARGV 1 the customer id.
#[derive(Debug, Clone, Copy)]
pub struct CustomerDialogs<'a> {
    pub customer: CustomerId,
    /// The shards of one slot group.
    pub shards: &'a [Shard],
}

impl CustomerDialogs<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 2 * self.shards.len());
        for &shard in self.shards {
            cmd.arg(keys.customer_index(shard, self.customer.get()))
                .arg(keys.earlier_customer_index(shard, self.customer.get()));
        }
        cmd.arg(self.customer.get());
        cmd
    }
}

/// The reply: the dialog ids.
pub fn decode(reply: Vec<i64>) -> Vec<DialogId> {
    reply.into_iter().map(DialogId::from_stored).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::wire::test_support::words;

    #[test]
    fn the_call_names_each_shards_indexes_and_the_customer_and_the_reply_its_dialogs() {
        let keys = Keyspace::new("t");
        let cmd = CustomerDialogs {
            customer: CustomerId::from_stored(9),
            shards: &[1, 2],
        }
        .command(&keys);
        assert_eq!(
            words(&cmd),
            [
                "4",
                &keys.customer_index(1, 9),
                &keys.earlier_customer_index(1, 9),
                &keys.customer_index(2, 9),
                &keys.earlier_customer_index(2, 9),
                "9"
            ]
        );
        assert_eq!(decode(vec![3, 4]), [DialogId::from_stored(3), DialogId::from_stored(4)]);
    }
}
