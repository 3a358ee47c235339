//! finish.lua: a flush batch finished after its PostgreSQL commit (or a refusal after
//! its erasure): trims, forgets erased refusals, takes back lost decisions, re-queues,
//! acknowledges.

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::domain::TakeBack;
use crate::staging::{Finished, GROUP, Keyspace, Shard};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/finish.lua")));

/// finish.lua's words for what a dialog's values do not hold.
const NOTHING_WRITTEN: &str = "";
const NO_REFUSAL: &str = "";
const NOTHING_TO_TAKE_BACK: &str = "";
/// The decision to take back.
const TAKE_BACK_REFUSAL: &str = "refusal";
const TAKE_BACK_GRANT: &str = "grant";

/// The call: KEYS per dialog its meta, msgs, quarantined msgs and its shard's flush
/// stream, then the streams whose entries to acknowledge; ARGV 1 the group, 2 how many
/// dialogs, 3 ttl (ms), then eight values per dialog (see finish.lua), then per stream
/// how many entries and their ids.
#[derive(Debug, Clone, Copy)]
pub struct Finish<'a> {
    pub ttl_ms: u64,
    pub dialogs: &'a [&'a Finished],
    /// The entries to acknowledge, by their stream's shard.
    pub entries: &'a [&'a (Shard, Vec<String>)],
}

impl Finish<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 4 * self.dialogs.len() + self.entries.len());
        for f in self.dialogs {
            let d = f.dialog.get();
            cmd.arg(keys.meta(d))
                .arg(keys.msgs(d))
                .arg(keys.quarantined_msgs(d))
                .arg(keys.flush_stream_of(d));
        }
        for (shard, _) in self.entries {
            cmd.arg(keys.flush_stream(*shard));
        }
        cmd.arg(GROUP).arg(self.dialogs.len()).arg(self.ttl_ms);
        for f in self.dialogs {
            cmd.arg(f.life.wire()).arg(f.dialog.get());
            match f.written_up_to {
                Some(seq) => cmd.arg(seq),
                None => cmd.arg(NOTHING_WRITTEN),
            };
            cmd.arg(f.read);
            match f.erased_refusal {
                Some(epoch) => cmd.arg(epoch),
                None => cmd.arg(NO_REFUSAL),
            };
            match f.take_back {
                None => cmd
                    .arg(NOTHING_TO_TAKE_BACK)
                    .arg(NOTHING_TO_TAKE_BACK)
                    .arg(NOTHING_TO_TAKE_BACK),
                Some(TakeBack::Refusal { epoch }) => cmd.arg(TAKE_BACK_REFUSAL).arg(epoch).arg(NOTHING_TO_TAKE_BACK),
                Some(TakeBack::Grant {
                    epoch,
                    erased_before_us,
                }) => cmd.arg(TAKE_BACK_GRANT).arg(epoch).arg(erased_before_us),
            };
        }
        for (_, ids) in self.entries {
            cmd.arg(ids.len()).arg(ids);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DialogId;
    use crate::staging::Life;
    use crate::staging::wire::test_support::words;

    #[test]
    fn each_dialog_names_what_was_written_erased_and_taken_back_then_each_stream_its_entries() {
        let keys = Keyspace::new("t");
        let written = Finished {
            dialog: DialogId::from_stored(7),
            life: Life::stamped("40"),
            written_up_to: Some(9),
            read: 3,
            erased_refusal: None,
            take_back: None,
        };
        let refused = Finished {
            dialog: DialogId::from_stored(8),
            life: Life::UNSTAMPED,
            written_up_to: None,
            read: 0,
            erased_refusal: Some(55),
            take_back: Some(TakeBack::Refusal { epoch: 60 }),
        };
        let regranted = Finished {
            dialog: DialogId::from_stored(9),
            take_back: Some(TakeBack::Grant {
                epoch: 70,
                erased_before_us: 65,
            }),
            ..written.clone()
        };
        let shard = Keyspace::shard_of(7);
        let entries = (shard, vec!["1-0".to_owned(), "2-0".to_owned()]);
        let call = Finish {
            ttl_ms: 1000,
            dialogs: &[&written, &refused, &regranted],
            entries: &[&entries],
        };
        let mut want = vec!["13".to_owned()];
        for d in [7, 8, 9] {
            want.extend([
                keys.meta(d),
                keys.msgs(d),
                keys.quarantined_msgs(d),
                keys.flush_stream_of(d),
            ]);
        }
        want.push(keys.flush_stream(shard));
        want.extend(
            [
                GROUP, "3", "1000", //
                "40", "7", "9", "3", "", "", "", "", //
                "", "8", "", "0", "55", "refusal", "60", "", //
                "40", "9", "9", "3", "", "grant", "70", "65", //
                "2", "1-0", "2-0",
            ]
            .map(String::from),
        );
        assert_eq!(words(&call.command(&keys)), want);
    }
}
