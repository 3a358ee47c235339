//! prune.lua: consumers of the flush group that are gone, deleted unless they hold an
//! entry.

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::staging::{GROUP, Keyspace, Shard};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/prune.lua")));

/// The call: KEYS 1 the shard's flush stream; ARGV 1 the group, then the consumer names.
/// The reply: how many were deleted.
#[derive(Debug, Clone, Copy)]
pub struct Prune<'a> {
    pub shard: Shard,
    pub consumers: &'a [String],
}

impl Prune<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 1);
        cmd.arg(keys.flush_stream(self.shard)).arg(GROUP).arg(self.consumers);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::wire::test_support::words;

    #[test]
    fn the_call_names_the_stream_the_group_and_the_consumers() {
        let keys = Keyspace::new("t");
        let consumers = ["a".to_owned(), "b".to_owned()];
        let cmd = Prune {
            shard: 3,
            consumers: &consumers,
        }
        .command(&keys);
        assert_eq!(words(&cmd), ["1", &keys.flush_stream(3), GROUP, "a", "b"]);
    }
}
