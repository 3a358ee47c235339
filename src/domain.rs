//! The words of the contract as types: IDs, message text, language tags, consent
//! decisions and read cursors, each with a `parse` constructor that is the one place its
//! rules live. No I/O here; every rejection is a [`Invalid`] whose message a person can
//! act on and which never repeats customer text.

use std::fmt;

/// Why an input was rejected. The message is safe to show to the caller: it names the
/// rule, never the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("`{0}` must be a non-negative decimal integer no larger than 9223372036854775807")]
    Id(&'static str),
    #[error("`text` must not be empty")]
    EmptyText,
    #[error("`text` is longer than {max} UTF-8 bytes")]
    TextTooLong { max: usize },
    #[error("`text` must not contain the character U+0000")]
    NulInText,
    #[error(
        "`language` must be a language tag such as `EN` or `pt-BR`: 2 or 3 letters, then optional `-` subtags of 1 to 8 letters or digits, 35 characters at most"
    )]
    Language,
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("`{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("the body must be a JSON object such as {{\"approved\": true}}, or a bare `true` or `false`")]
    ConsentShape,
    #[error("the cursor was not issued by this service; start again with `cursor=`")]
    Cursor,
    #[error("the resume token was not issued by this service for this store; start again without `resume`")]
    ResumeToken,
    #[error("`messageId` must be 1 to 64 characters of `A-Z a-z 0-9 . _ : -`")]
    MessageId,
    #[error(
        "the item is JSON this service cannot read (such as a number beyond a 64-bit float's range, nesting deeper than 128 levels, or an unpaired \\u surrogate)"
    )]
    UnreadableItem,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(i64);

        impl $name {
            /// Parses a path or query value: ASCII digits only, within `0..=i64::MAX`.
            pub fn parse(raw: &str) -> Result<Self, Invalid> {
                parse_id(raw).map(Self).ok_or(Invalid::Id($field))
            }

            /// Wraps a value read back from a store, where it was validated on the way in.
            pub fn from_stored(value: i64) -> Self {
                Self(value)
            }

            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// The customer a dialog belongs to.
    CustomerId,
    "customerId"
);
id_type!(
    /// One conversation.
    DialogId,
    "dialogId"
);

impl CustomerId {
    /// Stands for a customer nobody could tell yet: a refusal recorded while PostgreSQL,
    /// which knew the dialog's customer, was away. Never a parsed id (those are ≥ 0).
    pub const UNKNOWN: CustomerId = CustomerId(-1);
}

fn parse_id(raw: &str) -> Option<i64> {
    // `i64::from_str` also takes a leading `+` or `-`; the contract allows digits only.
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// The text of one customer input: 1 ..= `max` UTF-8 bytes, no U+0000.
#[derive(Clone, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub fn parse(raw: String, max_bytes: usize) -> Result<Self, Invalid> {
        if raw.is_empty() {
            Err(Invalid::EmptyText)
        } else if raw.len() > max_bytes {
            Err(Invalid::TextTooLong { max: max_bytes })
        } else if raw.contains('\0') {
            Err(Invalid::NulInText)
        } else {
            Ok(Self(raw))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Customer text is never printed, not even by `{:?}`.
impl fmt::Debug for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageText({} bytes)", self.0.len())
    }
}

/// A language tag, stored as sent: `^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$`, ≤ 35 chars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Language(String);

impl Language {
    pub const MAX_LEN: usize = 35;

    pub fn parse(raw: String) -> Result<Self, Invalid> {
        if is_language_tag(&raw) {
            Ok(Self(raw))
        } else {
            Err(Invalid::Language)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_language_tag(raw: &str) -> bool {
    if raw.len() > Language::MAX_LEN {
        return false;
    }
    let mut parts = raw.split('-');
    let primary = parts.next().unwrap_or_default();
    (2..=3).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_alphabetic())
        && parts.all(|sub| (1..=8).contains(&sub.len()) && sub.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The client's own id for a message, which makes its retries safe: 1 … 64 characters
/// of `A-Z a-z 0-9 . _ : -`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageId(String);

impl MessageId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: String) -> Result<Self, Invalid> {
        let valid = (1..=Self::MAX_LEN).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b));
        if valid { Ok(Self(raw)) } else { Err(Invalid::MessageId) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One message as a client sends it, validated.
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    pub text: MessageText,
    pub language: Language,
    pub message_id: Option<MessageId>,
}

/// A dialog PostgreSQL holds as granted: its customer and the highest seq it stores (0
/// when none) — enough to bring the dialog back in Redis, granted, its seqs continuing.
/// The one shape of "a grant PostgreSQL holds": the store answers it
/// (`store::HeldDialog::Granted`), the flusher settles an unverified dialog with it
/// (`staging::InStore::Granted`), and a decision revives a forgotten dialog with it
/// (`staging::Revival::Granted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedDialog {
    pub customer: CustomerId,
    /// The highest seq stored (0 when none).
    pub last_seq: i64,
}

/// The customer's latest decision about one dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    Granted,
    Refused,
}

impl Decision {
    /// The word used in API answers and in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pending => "pending",
            Decision::Granted => "granted",
            Decision::Refused => "refused",
        }
    }
}

/// A dialog's state as staging last saw it: what the flusher and the refusal handler
/// hand to the store.
#[derive(Debug, Clone)]
pub struct DialogState {
    pub dialog: DialogId,
    pub customer: CustomerId,
    pub decision: Decision,
    /// Bumped by every decision; PostgreSQL ignores states older than the one it holds.
    pub epoch: i64,
    pub decided_at_us: i64,
    /// A refusal recorded in Redis whose erasure PostgreSQL has not confirmed yet. Any
    /// write of this state erases the dialog under that refusal's epoch first, so a grant
    /// that follows a refusal can never keep what the refusal took back.
    pub unerased_refusal: Option<Refusal>,
    /// Staged messages in seq order (for a grant; empty for a refusal).
    pub messages: Vec<StagedMessage>,
    /// What the audit trail still needs of this state (see [`Audit`]).
    pub audit: Audit,
}

/// What the audit trail (GET /audit) needs of a state being written, beyond the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// A grant whose event no transaction has written yet (Redis's meta `a`): written by
    /// the one that first writes a decision at least as new to PostgreSQL — the grant's
    /// flush, or a refusal that overtook it.
    pub unwritten_grant: Option<GrantToAudit>,
    /// The seqs of staged messages a refusal deleted from Redis: its event counts them
    /// with what PostgreSQL erased, each once.
    pub erased_staged: Vec<i64>,
}

/// A grant awaiting its audit event: its epoch and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantToAudit {
    pub epoch: i64,
    pub decided_at_us: i64,
}

/// A refusal as PostgreSQL must apply it: the epoch it was recorded under and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub epoch: i64,
    pub decided_at_us: i64,
}

/// A decision PostgreSQL holds that is newer than Redis's for the same dialog: Redis lost
/// it (a failover to a replica that missed it, a restore) and takes it back when a flush
/// is fenced by it (finish.lua), instead of flushing and being fenced for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeBack {
    /// A refusal at this epoch: Redis refuses the dialog again and deletes what it stages.
    Refusal { epoch: i64 },
    /// A grant at this epoch: Redis moves its epoch on to it (the next flush is not
    /// fenced) and drops what it staged before the dialog was last erased (µs; 0: never),
    /// which that erasure took and must not come back.
    Grant { epoch: i64, erased_before_us: i64 },
}

/// One staged message of a dialog.
#[derive(Clone)]
pub struct StagedMessage {
    pub seq: i64,
    /// When dapi accepted it, in microseconds since the Unix epoch (Redis's clock).
    pub received_at_us: i64,
    pub language: String,
    pub text: String,
    /// The client's id for it, if it gave one.
    pub message_id: Option<String>,
}

/// Customer text is never printed, not even by `{:?}`.
impl fmt::Debug for StagedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagedMessage")
            .field("seq", &self.seq)
            .field("received_at_us", &self.received_at_us)
            .field("language", &self.language)
            .field("text_bytes", &self.text.len())
            .field("message_id", &self.message_id)
            .finish()
    }
}

/// Reads a message body, `{"text": …, "language": …}`; other fields are ignored.
pub fn parse_message(body: serde_json::Value, max_text_bytes: usize) -> Result<IncomingMessage, Invalid> {
    let serde_json::Value::Object(fields) = body else {
        return Err(Invalid::WrongType {
            field: "body",
            expected: "a JSON object with `text` and `language`",
        });
    };
    parse_message_fields(fields, max_text_bytes)
}

/// The fields of one message (a single POST's body, or one item of a batch).
pub fn parse_message_fields(
    mut fields: serde_json::Map<String, serde_json::Value>,
    max_text_bytes: usize,
) -> Result<IncomingMessage, Invalid> {
    let mut string = |field: &'static str| match fields.remove(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Invalid::WrongType {
            field,
            expected: "a string",
        }),
    };
    let text = MessageText::parse(string("text")?.ok_or(Invalid::Missing("text"))?, max_text_bytes)?;
    let language = Language::parse(string("language")?.ok_or(Invalid::Missing("language"))?)?;
    let message_id = string("messageId")?.map(MessageId::parse).transpose()?;
    Ok(IncomingMessage {
        text,
        language,
        message_id,
    })
}

/// Reads a consent body in any of the shapes existing clients send:
/// `{"approved": true}`, `{"approved": "true"}` (any case), or a bare `true` / `false`.
pub fn parse_consent(body: &serde_json::Value) -> Result<bool, Invalid> {
    use serde_json::Value;
    match body {
        Value::Bool(approved) => Ok(*approved),
        Value::Object(fields) => match fields.get("approved") {
            None | Some(Value::Null) => Err(Invalid::Missing("approved")),
            Some(Value::Bool(approved)) => Ok(*approved),
            Some(Value::String(word)) if word.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(word)) if word.eq_ignore_ascii_case("false") => Ok(false),
            Some(_) => Err(Invalid::WrongType {
                field: "approved",
                expected: "true or false (a JSON boolean, or the string \"true\" or \"false\")",
            }),
        },
        _ => Err(Invalid::ConsentShape),
    }
}

/// A position in the newest-first order of consented messages: the last row a cursor
/// page returned. Encoded as hex with a version byte and a checksum, so that a string
/// the service did not issue is rejected rather than silently read as some position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `receivedAt` of the last row, in microseconds since the Unix epoch.
    pub received_at_us: i64,
    pub dialog_id: i64,
    pub seq: i64,
}

const CURSOR_VERSION: u8 = 1;
const CURSOR_BYTES: usize = 1 + 3 * 8 + 4;

impl Cursor {
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(CURSOR_BYTES);
        bytes.push(CURSOR_VERSION);
        for part in [self.received_at_us, self.dialog_id, self.seq] {
            bytes.extend_from_slice(&part.to_be_bytes());
        }
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_be_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        if raw.len() != CURSOR_BYTES * 2 || !raw.is_ascii() {
            return Err(Invalid::Cursor);
        }
        let bytes = (0..CURSOR_BYTES)
            .map(|i| u8::from_str_radix(&raw[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| Invalid::Cursor)?;
        let (body, sum) = bytes.split_at(CURSOR_BYTES - 4);
        if body[0] != CURSOR_VERSION || checksum(body).to_be_bytes() != sum {
            return Err(Invalid::Cursor);
        }
        let part = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&body[1 + 8 * i..9 + 8 * i]);
            i64::from_be_bytes(word)
        };
        let cursor = Cursor {
            received_at_us: part(0),
            dialog_id: part(1),
            seq: part(2),
        };
        if cursor.dialog_id < 0 || cursor.seq < 1 {
            return Err(Invalid::Cursor);
        }
        Ok(cursor)
    }
}

/// FNV-1a, seeded so that a cursor of another service or version does not check out.
/// It guards against typos and tampering by accident, not against an adversary: a
/// forged cursor can only name a position, which grants nothing.
pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5 ^ 0x6461_7069; // "dapi"
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_accept_digits_within_i64_only() {
        assert_eq!(DialogId::parse("0").map(DialogId::get), Ok(0));
        assert_eq!(DialogId::parse("9223372036854775807").map(DialogId::get), Ok(i64::MAX));
        for bad in ["", "-1", "+1", "1.0", "abc", " 1", "9223372036854775808", "１"] {
            assert_eq!(DialogId::parse(bad), Err(Invalid::Id("dialogId")), "{bad:?}");
        }
    }

    #[test]
    fn text_is_bounded_and_free_of_nul() {
        assert!(MessageText::parse("Hello, World".into(), 32).is_ok());
        assert_eq!(MessageText::parse(String::new(), 32), Err(Invalid::EmptyText));
        assert_eq!(
            MessageText::parse("é".repeat(3), 5),
            Err(Invalid::TextTooLong { max: 5 })
        );
        assert_eq!(MessageText::parse("a\0b".into(), 32), Err(Invalid::NulInText));
    }

    #[test]
    fn text_debug_output_hides_the_text() {
        let text = MessageText::parse("secret".into(), 32).map(|t| format!("{t:?}"));
        assert_eq!(text.as_deref(), Ok("MessageText(6 bytes)"));
    }

    #[test]
    fn language_tags_follow_the_contract() {
        for good in ["EN", "en", "deu", "pt-BR", "zh-Hant-TW", "en-123", "en-a"] {
            let parsed = Language::parse(good.into());
            assert_eq!(parsed.as_ref().map(Language::as_str), Ok(good), "{good:?}");
        }
        let too_long = format!("en{}", "-abcdefgh".repeat(4));
        for bad in [
            "",
            "e",
            "engl",
            "en-",
            "en--US",
            "en_US",
            "e1",
            "en-abcdefghi",
            &too_long,
        ] {
            assert_eq!(Language::parse(bad.into()), Err(Invalid::Language), "{bad:?}");
        }
    }

    #[test]
    fn message_bodies_are_checked_field_by_field() {
        let ok = parse_message(json!({"text": "hi", "language": "EN", "extra": 1}), 10);
        assert!(ok.is_ok());
        assert_eq!(
            parse_message(json!({"language": "EN"}), 10).err(),
            Some(Invalid::Missing("text"))
        );
        assert!(matches!(
            parse_message(json!({"text": 5, "language": "EN"}), 10),
            Err(Invalid::WrongType { field: "text", .. })
        ));
        assert!(matches!(
            parse_message(json!(["hi"]), 10),
            Err(Invalid::WrongType { field: "body", .. })
        ));
        assert_eq!(
            parse_message(json!({"text": "hi", "language": "english"}), 10).err(),
            Some(Invalid::Language)
        );
    }

    #[test]
    fn consent_accepts_the_three_shapes() {
        assert_eq!(parse_consent(&json!(true)), Ok(true));
        assert_eq!(parse_consent(&json!(false)), Ok(false));
        assert_eq!(parse_consent(&json!({"approved": true})), Ok(true));
        assert_eq!(parse_consent(&json!({"approved": "TRUE"})), Ok(true));
        assert_eq!(parse_consent(&json!({"approved": "False", "x": 1})), Ok(false));
        assert_eq!(parse_consent(&json!({})), Err(Invalid::Missing("approved")));
        assert!(parse_consent(&json!({"approved": "yes"})).is_err());
        assert!(parse_consent(&json!({"approved": 1})).is_err());
        assert_eq!(parse_consent(&json!([true])), Err(Invalid::ConsentShape));
        assert_eq!(parse_consent(&json!("true")), Err(Invalid::ConsentShape));
    }

    #[test]
    fn cursors_round_trip_and_reject_what_was_not_issued() {
        let cursor = Cursor {
            received_at_us: 1_795_000_000_123_456,
            dialog_id: 42,
            seq: 7,
        };
        let encoded = cursor.encode();
        assert_eq!(Cursor::parse(&encoded), Ok(cursor));

        let mut tampered = encoded.clone().into_bytes();
        tampered[20] = if tampered[20] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap_or_default();
        for bad in ["", "abc", "zz", &tampered, &encoded[2..], &format!("{encoded}00")] {
            assert_eq!(Cursor::parse(bad), Err(Invalid::Cursor), "{bad:?}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::Bool),
                any::<i64>().prop_map(Into::into),
                ".{0,12}".prop_map(serde_json::Value::String),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("approved".to_owned()),
                            Just("text".to_owned()),
                            Just("language".to_owned()),
                            ".{0,6}"
                        ],
                        inner,
                        0..4
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn id_parsing_never_panics_and_accepts_exactly_digits_in_range(raw in ".{0,24}") {
                let parsed = DialogId::parse(&raw);
                let valid = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) && raw.parse::<i64>().is_ok();
                prop_assert_eq!(parsed.is_ok(), valid);
            }

            #[test]
            fn every_non_negative_i64_round_trips_through_its_decimal_form(n in 0..=i64::MAX) {
                prop_assert_eq!(CustomerId::parse(&n.to_string()).map(CustomerId::get), Ok(n));
            }

            #[test]
            fn text_and_language_parsing_never_panic(text in ".{0,64}", language in ".{0,40}", max in 1usize..64) {
                if let Ok(t) = MessageText::parse(text.clone(), max) {
                    prop_assert!(!t.as_str().is_empty() && t.as_str().len() <= max && !t.as_str().contains('\0'));
                }
                if let Ok(l) = Language::parse(language) {
                    prop_assert!(l.as_str().len() <= Language::MAX_LEN);
                }
            }

            #[test]
            fn message_and_consent_bodies_never_panic(body in json()) {
                let _ = parse_message(body.clone(), 16);
                let _ = parse_consent(&body);
            }

            #[test]
            fn cursors_round_trip_and_garbage_is_rejected(at in any::<i64>(), dialog in 0..=i64::MAX, seq in 1..=i64::MAX, garbage in ".{0,80}") {
                let cursor = Cursor { received_at_us: at, dialog_id: dialog, seq };
                prop_assert_eq!(Cursor::parse(&cursor.encode()), Ok(cursor));
                if let Ok(parsed) = Cursor::parse(&garbage) {
                    prop_assert_eq!(parsed.encode(), garbage);
                }
            }
        }
    }
}
