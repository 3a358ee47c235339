//! index_sweep.lua: one chunk of a shard's customer index checked, the members of
//! dialogs gone removed.

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::staging::{Keyspace, Shard};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/index_sweep.lua")));

/// What index_sweep.lua takes for "from the first member" and answers for "the end of
/// the index was reached".
const FROM_THE_START: &str = "";

/// The call: KEYS 1 the shard's customer index; ARGV 1 the member to continue after
/// (`''`: from the start), 2 how many members to check.
#[derive(Debug, Clone, Copy)]
pub struct SweepChunk<'a> {
    pub shard: Shard,
    pub after: Option<&'a str>,
    pub count: usize,
}

impl SweepChunk<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 1);
        cmd.arg(keys.customer_index(self.shard))
            .arg(self.after.unwrap_or(FROM_THE_START))
            .arg(self.count);
        cmd
    }
}

/// The reply: where to continue (`None`: the end was reached) and how many members it
/// removed.
pub fn decode((last, removed): (String, u64)) -> (Option<String>, u64) {
    ((last != FROM_THE_START).then_some(last), removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::wire::test_support::words;

    #[test]
    fn the_call_names_the_index_the_cursor_and_the_chunk_and_the_reply_where_to_go_on() {
        let keys = Keyspace::new("t");
        let first = SweepChunk {
            shard: 3,
            after: None,
            count: 500,
        }
        .command(&keys);
        assert_eq!(words(&first), ["1", &keys.customer_index(3), "", "500"]);
        let next = SweepChunk {
            shard: 3,
            after: Some("7:12"),
            count: 500,
        }
        .command(&keys);
        assert_eq!(words(&next), ["1", &keys.customer_index(3), "7:12", "500"]);
        assert_eq!(decode(("7:12".to_owned(), 2)), (Some("7:12".to_owned()), 2));
        assert_eq!(decode((String::new(), 0)), (None, 0));
    }
}
