//! A staged message, as ingest.lua writes it into a dialog's msgs list:
//! `seq:receivedAt_µs:language:text`, or with a `messageId`
//! `seq:receivedAt_µs:language|messageId|:text` (neither a language nor a `messageId`
//! can hold `|`; the text may hold anything). Read back by the snapshot.

use crate::domain::StagedMessage;

/// Decodes one staged message; `None` for anything ingest.lua does not write.
pub fn decode(raw: &[u8]) -> Option<StagedMessage> {
    let mut parts = raw.splitn(3, |b| *b == b':');
    let mut number = || std::str::from_utf8(parts.next()?).ok()?.parse::<i64>().ok();
    let seq = number()?;
    let received_at_us = number()?;
    let rest = parts.next()?;
    let end = rest.iter().position(|b| *b == b':' || *b == b'|')?;
    let language = String::from_utf8(rest[..end].to_vec()).ok()?;
    let (message_id, text) = match rest[end] {
        b'|' => {
            let tail = &rest[end + 1..];
            let close = tail.iter().position(|b| *b == b'|')?;
            let text = tail[close + 1..].strip_prefix(b":")?;
            (Some(String::from_utf8(tail[..close].to_vec()).ok()?), text)
        }
        _ => (None, &rest[end + 1..]),
    };
    Some(StagedMessage {
        seq,
        received_at_us,
        language,
        text: String::from_utf8(text.to_vec()).ok()?,
        message_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_messages_decode_with_colons_in_the_text() {
        let m = decode(b"3:1795000000123456:pt-BR:a:b:c").expect("decodes"); // allow: test
        assert_eq!((m.seq, m.received_at_us), (3, 1_795_000_000_123_456));
        assert_eq!((m.language.as_str(), m.text.as_str()), ("pt-BR", "a:b:c"));
        assert!(m.message_id.is_none());
        assert!(decode(b"x:1:EN:t").is_none());
        assert!(decode(b"1:2:EN").is_none());
        let m = decode(b"4:5:EN|ab:c.1|:x|y:z").expect("decodes"); // allow: test
        assert_eq!((m.message_id.as_deref(), m.text.as_str()), (Some("ab:c.1"), "x|y:z"));
        assert!(decode(b"4:5:EN|open:x").is_none());
    }
}
