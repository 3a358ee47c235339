//! JSON bodies read strictly: an object that names one key twice is refused (400
//! `malformed_body`), never read as its last (or first) value. RFC 8259 leaves such an
//! object's meaning to the reader; a consent must never rest on a guess — `{"approved":
//! true, "approved": false}` is neither a grant nor a refusal. One pass, as fast as
//! reading a `serde_json::Value`: the same visitor, with the duplicate check added.

use std::fmt;

use serde::Deserialize;
use serde::de::Error as _;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// What a duplicate key's error says: how [`is_duplicate_key`] tells it from others.
const DUPLICATE: &str = "an object names one key twice";

/// A JSON value in which no object names a key twice.
#[derive(Debug)]
pub struct Strict(pub Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

/// Whether reading JSON failed on a key named twice (and not on its syntax).
pub fn is_duplicate_key(error: &serde_json::Error) -> bool {
    error.classify() == serde_json::error::Category::Data && error.to_string().starts_with(DUPLICATE)
}

/// The error a reader built on [`Strict`] reports for a key named twice.
pub fn duplicate_key<E: de::Error>() -> E {
    E::custom(DUPLICATE)
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Strict::deserialize(deserializer).map(|s| s.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if object.insert(key, value).is_some() {
                return Err(A::Error::custom(DUPLICATE));
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Value, serde_json::Error> {
        serde_json::from_str::<Strict>(json).map(|s| s.0)
    }

    #[test]
    fn reads_what_serde_json_reads() {
        for json in [
            r#"{"a": [1, -2, 3.5, "x", null, true, {"b": {}}]}"#,
            "true",
            "[]",
            "\"s\"",
        ] {
            assert_eq!(read(json).ok(), serde_json::from_str::<Value>(json).ok(), "{json}");
        }
    }

    #[test]
    fn refuses_a_key_named_twice_at_any_depth() {
        for json in [
            r#"{"approved": true, "approved": false}"#,
            r#"{"a": 1, "b": {"c": 1, "c": 1}}"#,
            r#"[{"x": 1, "x": 1}]"#,
        ] {
            let error = read(json).expect_err(json);
            assert!(is_duplicate_key(&error), "{json}: {error}");
        }
        let syntax = read(r#"{"a": }"#).expect_err("not JSON");
        assert!(!is_duplicate_key(&syntax));
    }
}
