//! The wire between Rust and the Lua scripts: one module per script, each with the
//! script itself, a type for its input (its KEYS and ARGV, named) that builds the call,
//! and a type for its reply that decodes it. Nothing outside this module builds a
//! script's arguments by position or reads a reply by position; a sentinel of the Lua
//! side (`''` for "none", a status code, a letter) becomes an `Option` or an enum here
//! and nowhere else. Each script's header comment names the same words as the Rust
//! constants and variants that mirror it.
//!
//! A call is one `EVALSHA` built straight into one command buffer ([`eval`]), run by
//! [`run`], which loads the script first where Redis does not know it (a restart, a
//! failover, a new node).
//!
//! # A dialog's meta
//!
//! The hash `<prefix>:{<tag>}:d<id>:meta` (see the key layout in `staging`). Each field
//! letter has one meaning, whatever script writes it:
//!
//! | field | holds | written by |
//! |---|---|---|
//! | `a` | a grant awaiting its audit event: `<epoch>:<decided-at µs>` ([`GrantToAudit`]) | consent (a grant that changes the decision) |
//! | `b` | the life stamp: when Redis created this meta (µs), see [`crate::staging::Life`] | ingest, consent, claim (creation) |
//! | `c` | the customer id; `-1` for a refusal recorded while nobody could name the customer ([`crate::domain::CustomerId::UNKNOWN`]) | ingest, consent, claim |
//! | `d` | the decision: [`PENDING`], [`GRANTED`], [`REFUSED`] | ingest, consent, settle, finish, claim |
//! | `e` | the epoch of the latest decision (µs by Redis's clock, see `staging`'s "The epoch") | ingest (creation), consent (every decision), finish (a decision taken back), claim |
//! | `n` | the last seq handed out | ingest, consent (a revival), settle, claim |
//! | `q` | `1` while a flush-queue entry names the dialog, else `0` | ingest, consent, finish, quarantine, claim |
//! | `r` | the deadline (ms) ingest last set the expiry of meta and msgs to; `0` or absent: another script set their expiry, and ingest sets it again at the next message | ingest; every other script that sets the expiry zeroes or removes it |
//! | `t` | when the latest decision was recorded (µs; for a pending dialog, its creation) | ingest, consent, claim |
//! | `u` | `1` while the dialog is unverified: staged when PostgreSQL could not be asked about it, to be settled by the flusher; absent otherwise | ingest; settle removes it |
//! | `x` | the epoch of a refusal whose erasure PostgreSQL has not confirmed yet; the keys do not expire while it is set | consent; finish removes it |
//! | `xt` | when that refusal was recorded (µs) | consent; finish removes it |
//! | `xs` | the seqs of the staged messages that refusal deleted, comma-separated: answered again by a refusal before the confirmation, so an erasure run again after a crash counts them | consent; finish removes it |
//!
//! The decision letters are values of `d`, not fields: `d` = `r` (refused) has nothing to
//! do with the field `r`. Everything else a script is told or answers is a word (finish's
//! take-back kinds `refusal` and `grant`, settle's and consent's statuses), never a
//! letter that could be read as a field.

pub mod claim;
pub mod consent;
pub mod customer_dialogs;
pub mod erasure_record;
pub mod finish;
pub mod index_sweep;
pub mod ingest;
pub mod message;
pub mod prune;
pub mod quarantine;
pub mod settle;
pub mod snapshot;
pub mod status;

use redis::{FromRedisValue, Script, Value};

use super::{RedisConn, StagingError};
use crate::domain::{Decision, GrantToAudit};

/// `d` of a pending dialog.
pub const PENDING: &str = "p";
/// `d` of a granted dialog.
pub const GRANTED: &str = "g";
/// `d` of a refused dialog.
pub const REFUSED: &str = "r";

/// The letter `d` holds for `decision`.
pub fn decision_letter(decision: Decision) -> &'static str {
    match decision {
        Decision::Pending => PENDING,
        Decision::Granted => GRANTED,
        Decision::Refused => REFUSED,
    }
}

/// The decision a `d` letter stands for; `None` for anything dapi does not write.
pub fn decision_of(letter: &[u8]) -> Option<Decision> {
    match letter {
        l if l == PENDING.as_bytes() => Some(Decision::Pending),
        l if l == GRANTED.as_bytes() => Some(Decision::Granted),
        l if l == REFUSED.as_bytes() => Some(Decision::Refused),
        _ => None,
    }
}

/// Reads meta's `a`: `<epoch>:<decided-at µs>`.
pub fn grant_to_audit(raw: &[u8]) -> Option<GrantToAudit> {
    let (epoch, at) = std::str::from_utf8(raw).ok()?.split_once(':')?;
    Some(GrantToAudit {
        epoch: epoch.parse().ok()?,
        decided_at_us: at.parse().ok()?,
    })
}

/// The start of a call of `script` with `keys` keys: its KEYS and ARGV follow.
pub fn eval(script: &Script, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs a call built by [`eval`], loading `script` first where Redis does not know it
/// (as redis-rs's `ScriptInvocation` does).
pub async fn run<T: FromRedisValue>(conn: &mut RedisConn, script: &Script, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// A reply item as bytes: a bulk or simple string.
pub fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A reply item as text.
pub fn text(value: &Value) -> Option<&str> {
    std::str::from_utf8(bytes(value)?).ok()
}

/// A reply item as a number: an integer, or a string of one.
pub fn number(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// A reply that must be an array.
pub fn array(value: Value, what: &'static str) -> Result<Vec<Value>, StagingError> {
    match value {
        Value::Array(items) => Ok(items),
        _ => Err(StagingError::Corrupt(what)),
    }
}

#[cfg(test)]
pub mod test_support {
    use redis::Value;

    /// A call's KEYS and ARGV as text: everything after `EVALSHA <hash>`.
    pub fn words(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .skip(2)
            .map(|arg| match arg {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    pub fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_letters_read_back_and_nothing_else_reads() {
        for decision in [Decision::Pending, Decision::Granted, Decision::Refused] {
            assert_eq!(decision_of(decision_letter(decision).as_bytes()), Some(decision));
        }
        for other in [&b""[..], b"z", b"G", b"pg"] {
            assert_eq!(decision_of(other), None);
        }
    }

    #[test]
    fn a_grant_awaiting_its_audit_reads_epoch_and_time() {
        assert_eq!(
            grant_to_audit(b"17:18"),
            Some(GrantToAudit {
                epoch: 17,
                decided_at_us: 18
            })
        );
        for bad in [&b""[..], b"17", b"a:1", b"1:"] {
            assert_eq!(grant_to_audit(bad), None);
        }
    }
}
