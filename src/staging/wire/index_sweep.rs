//! index_sweep.lua: a chunk of a shard's customer index buckets checked, the members of
//! dialogs gone removed.

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::staging::{Keyspace, Shard};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/index_sweep.lua")));

/// What index_sweep.lua takes for "from the bucket's first member".
const FROM_THE_START: &str = "";

/// The call: KEYS the buckets `buckets` of `shard`'s index, in order; ARGV 1 the member
/// of the first to continue after (`''`: its first), 2 how many members to check at most.
#[derive(Debug, Clone, Copy)]
pub struct SweepChunk<'a> {
    pub shard: Shard,
    pub buckets: &'a [String],
    pub after: Option<&'a str>,
    pub budget: usize,
}

impl SweepChunk<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, self.buckets.len());
        for bucket in self.buckets {
            cmd.arg(keys.customer_bucket_key(self.shard, bucket));
        }
        cmd.arg(self.after.unwrap_or(FROM_THE_START)).arg(self.budget);
        cmd
    }
}

/// Where a sweep call stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swept {
    /// Every bucket given was walked to its end.
    All { removed: u64 },
    /// The budget ran out in the `bucket`th bucket given (0-based), after `member`.
    Within {
        bucket: usize,
        member: String,
        removed: u64,
    },
}

/// The reply: `{1-based bucket index (#KEYS + 1: all done), member, removed}`.
pub fn decode((bucket, member, removed): (usize, String, u64), buckets: usize) -> Swept {
    if bucket > buckets || bucket == 0 {
        Swept::All { removed }
    } else {
        Swept::Within {
            bucket: bucket - 1,
            member,
            removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::wire::test_support::words;

    #[test]
    fn the_call_names_the_buckets_the_cursor_and_the_budget_and_the_reply_where_to_go_on() {
        let keys = Keyspace::new("t");
        let buckets = ["7".to_owned(), "8".to_owned()];
        let first = SweepChunk {
            shard: 3,
            buckets: &buckets,
            after: None,
            budget: 500,
        }
        .command(&keys);
        assert_eq!(
            words(&first),
            [
                "2",
                &keys.customer_bucket_key(3, "7"),
                &keys.customer_bucket_key(3, "8"),
                "",
                "500"
            ]
        );
        let next = SweepChunk {
            shard: 3,
            buckets: &buckets,
            after: Some("7:12"),
            budget: 500,
        }
        .command(&keys);
        assert_eq!(words(&next)[3], "7:12");
        assert_eq!(
            decode((2, "8:40".to_owned(), 1), 2),
            Swept::Within {
                bucket: 1,
                member: "8:40".to_owned(),
                removed: 1
            }
        );
        assert_eq!(decode((3, String::new(), 4), 2), Swept::All { removed: 4 });
    }
}
