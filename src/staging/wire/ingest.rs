//! ingest.lua: stages messages, an answer per message.
//!
//! Redis's instructions per message are this path's budget (BENCHMARKS.md, "What Redis
//! does per message"): the call is written straight into one command buffer, and the
//! answer is one integer per message, decoded here.

use std::sync::LazyLock;

use redis::Script;

use super::eval;
use crate::domain::Decision;
use crate::staging::{Create, IngestOutcome, Keyspace, NewMessage, StagingError};

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/ingest.lua")));

/// A message without a `messageId`.
const NO_MESSAGE_ID: &str = "";
/// What to do when Redis does not know the dialog ([`Create`]): ingest.lua's words; a
/// revival is its last seq, a number.
const ASK_FIRST: &str = "";
const NEW: &str = "n";
const UNVERIFIED: &str = "u";

/// The call: KEYS per message its dialog's meta, msgs, ids and its shard's flush stream;
/// ARGV 1 ttl (ms), 2 idempotency window (ms), then per message its customer, language,
/// text, `messageId` (or [`NO_MESSAGE_ID`]) and what to do when Redis does not know the
/// dialog.
#[derive(Debug, Clone, Copy)]
pub struct Stage<'a> {
    pub ttl_ms: u64,
    pub idempotency_window_ms: u64,
    pub messages: &'a [&'a NewMessage<'a>],
}

impl Stage<'_> {
    pub fn command(&self, keys: &Keyspace) -> redis::Cmd {
        let mut cmd = eval(&SCRIPT, 4 * self.messages.len());
        for m in self.messages {
            let d = m.dialog.get();
            cmd.arg(keys.dialog_key_arg(d, "meta"))
                .arg(keys.dialog_key_arg(d, "msgs"))
                .arg(keys.dialog_key_arg(d, "ids"))
                .arg(keys.flush_stream_arg(Keyspace::shard_of(d)));
        }
        cmd.arg(self.ttl_ms).arg(self.idempotency_window_ms);
        for m in self.messages {
            cmd.arg(m.customer.get())
                .arg(m.message.language.as_str())
                .arg(m.message.text.as_str())
                .arg(m.message.message_id.as_ref().map_or(NO_MESSAGE_ID, |id| id.as_str()));
            match m.create {
                Create::Not => cmd.arg(ASK_FIRST),
                Create::New => cmd.arg(NEW),
                Create::Revive { last_seq } => cmd.arg(last_seq),
                Create::Unverified => cmd.arg(UNVERIFIED),
            };
        }
        cmd
    }

    /// The reply: an outcome per message, in order.
    pub fn decode(&self, reply: &[i64]) -> Result<Vec<IngestOutcome>, StagingError> {
        if reply.len() != self.messages.len() {
            return Err(StagingError::Corrupt("ingest reply has the wrong length"));
        }
        reply.iter().map(|&item| outcome(item)).collect()
    }
}

/// An item's status, `(item >> 2) & 7`: ingest.lua's words.
const STAGED: i64 = 0;
const REPEAT: i64 = 1;
const MISMATCH: i64 = 2;
const REFUSED: i64 = 3;
const UNKNOWN: i64 = 4;
const SET_ASIDE: i64 = 5;

/// The decisions by their code, `item & 3`: ingest.lua's `DECISION` (`p` 0, `g` 1, `r` 2).
const DECISIONS: [Decision; 3] = [Decision::Pending, Decision::Granted, Decision::Refused];

fn decision(code: i64) -> Result<Decision, StagingError> {
    usize::try_from(code)
        .ok()
        .and_then(|code| DECISIONS.get(code).copied())
        .ok_or(StagingError::Corrupt("decision"))
}

/// One item of the answer: `seq * 32 + status * 4 + decision` (ingest.lua says why
/// integers); seq and decision are 0 unless the message was staged or is a repeat.
fn outcome(item: i64) -> Result<IngestOutcome, StagingError> {
    let (seq, status, code) = (item >> 5, (item >> 2) & 7, item & 3);
    Ok(match status {
        STAGED | REPEAT if seq > 0 => IngestOutcome::Accepted {
            seq,
            decision: decision(code)?,
            duplicate: status == REPEAT,
        },
        MISMATCH => IngestOutcome::CustomerMismatch,
        REFUSED => IngestOutcome::ConsentRefused,
        UNKNOWN => IngestOutcome::Unknown,
        SET_ASIDE => IngestOutcome::SetAside,
        _ => return Err(StagingError::Corrupt("ingest reply")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CustomerId, DialogId, IncomingMessage, Language, MessageId, MessageText};
    use crate::staging::wire::test_support::words;

    #[test]
    fn each_message_names_its_keys_then_its_customer_text_id_and_how_to_create_its_dialog() {
        let keys = Keyspace::new("t");
        let plain = IncomingMessage {
            text: MessageText::parse("hi".into(), 100).unwrap(),
            language: Language::parse("EN".into()).unwrap(),
            message_id: None,
        };
        let with_id = IncomingMessage {
            message_id: Some(MessageId::parse("m-1".into()).unwrap()),
            ..plain.clone()
        };
        let message = |d: i64, message, create| NewMessage {
            customer: CustomerId::from_stored(3),
            dialog: DialogId::from_stored(d),
            message,
            create,
        };
        let messages = [
            message(7, &plain, Create::Not),
            message(8, &with_id, Create::New),
            message(9, &plain, Create::Revive { last_seq: 12 }),
            message(10, &plain, Create::Unverified),
        ];
        let refs: Vec<&NewMessage<'_>> = messages.iter().collect();
        let call = Stage {
            ttl_ms: 1000,
            idempotency_window_ms: 2000,
            messages: &refs,
        };
        let mut want = vec!["16".to_owned()];
        for d in [7, 8, 9, 10] {
            want.extend([keys.meta(d), keys.msgs(d), keys.ids(d), keys.flush_stream_of(d)]);
        }
        want.extend(["1000", "2000"].map(String::from));
        for (id, create) in [("", ""), ("m-1", "n"), ("", "12"), ("", "u")] {
            want.extend(["3", "EN", "hi", id, create].map(String::from));
        }
        assert_eq!(words(&call.command(&keys)), want);
    }

    #[test]
    fn ingest_answers_decode_to_their_outcomes_and_anything_else_is_corrupt() {
        let staged = |seq: i64, status: i64, decision: i64| seq * 32 + status * 4 + decision;
        let outcomes: Vec<_> = [
            staged(7, 0, 0),
            staged(8, 1, 1),
            staged(9, 0, 2),
            staged(0, 2, 0),
            staged(0, 3, 0),
            staged(0, 4, 0),
            staged(0, 5, 0),
        ]
        .into_iter()
        .map(|item| outcome(item).unwrap())
        .collect();
        assert_eq!(
            outcomes,
            [
                IngestOutcome::Accepted {
                    seq: 7,
                    decision: Decision::Pending,
                    duplicate: false
                },
                IngestOutcome::Accepted {
                    seq: 8,
                    decision: Decision::Granted,
                    duplicate: true
                },
                IngestOutcome::Accepted {
                    seq: 9,
                    decision: Decision::Refused,
                    duplicate: false
                },
                IngestOutcome::CustomerMismatch,
                IngestOutcome::ConsentRefused,
                IngestOutcome::Unknown,
                IngestOutcome::SetAside,
            ]
        );
        for corrupt in [staged(0, 0, 0), staged(3, 0, 3), staged(3, 6, 0), -1] {
            assert!(matches!(outcome(corrupt), Err(StagingError::Corrupt(_))), "{corrupt}");
        }
        let call = Stage {
            ttl_ms: 1,
            idempotency_window_ms: 1,
            messages: &[],
        };
        assert!(matches!(call.decode(&[staged(7, 0, 0)]), Err(StagingError::Corrupt(_))));
    }
}
