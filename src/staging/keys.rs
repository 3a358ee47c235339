//! Every Redis key dapi uses, in one place: see the key layout in the module above.
//!
//! # Shards
//!
//! Dialogs are spread over [`SHARDS`] fixed virtual shards by a hash of their id. Every
//! key of a dialog and its shard's flush stream carry the shard's hash tag, so that on a
//! Redis Cluster each script call stays inside one slot: a message's append and its
//! queue entry, a batch's snapshot and its finish. One Redis holds the same keys; there
//! is one layout and one code path, and only [`Keyspace::slot_group`] differs: on one
//! Redis every shard is in one group (one script call for a whole batch, one blocking
//! read over every stream), on a cluster each shard is its own group.
//!
//! The shard count and the tags are fixed for every deployment: a dialog's shard must
//! never change while it has keys. The tags are chosen so that their slots lie evenly
//! over the cluster's 16384 (shard k's tag in the k-th 64th of the slot range), so any
//! even split of slots between primaries gets an even share of shards.

use std::sync::Arc;

/// How many virtual shards the dialogs are spread over. Fixed: see the module doc.
pub const SHARDS: u16 = 64;

/// A shard's index, `0..SHARDS`.
pub type Shard = u16;

/// Redis Cluster's slot count.
const SLOTS: u16 = 16384;

/// A key under a shard's prefix, formatted where it is written (see
/// [`Keyspace::dialog_key_arg`]).
#[derive(Debug, Clone, Copy)]
pub struct DialogKey<'k> {
    shard_prefix: &'k str,
    /// `None`: a key of the shard itself.
    dialog: Option<i64>,
    suffix: &'k str,
}

impl std::fmt::Display for DialogKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dialog {
            None => write!(f, "{}:{}", self.shard_prefix, self.suffix),
            Some(dialog) => write!(f, "{}:d{}:{}", self.shard_prefix, dialog, self.suffix),
        }
    }
}

impl redis::ToRedisArgs for DialogKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        // The pieces copied as they are (`write!` through `Display` cost ~5 % of a single
        // POST's instructions); `decimal` is what `Display` of an i64 writes.
        let mut digits = [0u8; 20];
        let mut key = out.writer_for_next_arg();
        let mut put = |bytes: &[u8]| {
            // Writing into a growing buffer cannot fail.
            let _ = std::io::Write::write_all(&mut key, bytes);
        };
        put(self.shard_prefix.as_bytes());
        if let Some(dialog) = self.dialog {
            put(b":d");
            put(decimal(dialog, &mut digits));
        }
        put(b":");
        put(self.suffix.as_bytes());
    }
}

/// `n` (≥ 0) in decimal, in the tail of `buf`.
fn decimal(mut n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Builds every Redis key dapi uses.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: Arc<str>,
    /// `<prefix>:{<tag>}` per shard.
    shard_prefixes: Arc<[String]>,
    cluster: bool,
}

impl Keyspace {
    pub fn new(prefix: &str) -> Self {
        let shard_prefixes = (0..SHARDS).map(|k| format!("{prefix}:{{{}}}", shard_tag(k))).collect();
        Self {
            prefix: prefix.into(),
            shard_prefixes,
            cluster: false,
        }
    }

    /// The same keys, grouped for a Redis Cluster: one slot group per shard.
    pub fn for_cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Whether the keys are grouped for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The shard a dialog's keys live in: Fibonacci hashing of the id, so that ids with
    /// a common stride (every tenth, every even one) still spread evenly.
    pub fn shard_of(dialog: i64) -> Shard {
        // The top 6 bits of the product: 64 shards.
        const _: () = assert!(SHARDS == 64);
        ((dialog as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as Shard
    }

    /// Which script calls may share keys: every shard on one Redis, one shard per call
    /// on a cluster (a script must stay within one slot there).
    pub fn slot_group(&self, shard: Shard) -> Shard {
        if self.cluster { shard } else { 0 }
    }

    /// The shards, grouped as [`Keyspace::slot_group`] groups them.
    pub fn shard_groups(&self) -> Vec<Vec<Shard>> {
        if self.cluster {
            (0..SHARDS).map(|k| vec![k]).collect()
        } else {
            vec![(0..SHARDS).collect()]
        }
    }

    /// A key of a dialog: `<prefix>:{<tag>}:d<id>:<suffix>`.
    pub fn dialog_key(&self, dialog: i64, suffix: &str) -> String {
        self.dialog_key_arg(dialog, suffix).to_string()
    }

    /// The same key as a command argument, written straight into the command's buffer
    /// (the ingest path sends four a message; a `String` each was measurable).
    pub fn dialog_key_arg<'k>(&'k self, dialog: i64, suffix: &'k str) -> DialogKey<'k> {
        DialogKey {
            shard_prefix: &self.shard_prefixes[usize::from(Self::shard_of(dialog))],
            dialog: Some(dialog),
            suffix,
        }
    }

    /// A shard's flush stream as a command argument.
    pub fn flush_stream_arg(&self, shard: Shard) -> DialogKey<'_> {
        DialogKey {
            shard_prefix: &self.shard_prefixes[usize::from(shard)],
            dialog: None,
            suffix: "flush",
        }
    }

    pub fn meta(&self, dialog: i64) -> String {
        self.dialog_key(dialog, "meta")
    }

    pub fn msgs(&self, dialog: i64) -> String {
        self.dialog_key(dialog, "msgs")
    }

    pub fn ids(&self, dialog: i64) -> String {
        self.dialog_key(dialog, "ids")
    }

    pub fn quarantined_meta(&self, dialog: i64) -> String {
        self.dialog_key(dialog, "quarantined:meta")
    }

    pub fn quarantined_msgs(&self, dialog: i64) -> String {
        self.dialog_key(dialog, "quarantined:msgs")
    }

    /// A shard's flush stream.
    pub fn flush_stream(&self, shard: Shard) -> String {
        self.flush_stream_arg(shard).to_string()
    }

    /// The flush stream of a dialog's shard.
    pub fn flush_stream_of(&self, dialog: i64) -> String {
        self.flush_stream(Self::shard_of(dialog))
    }

    /// Which shard a flush stream's name belongs to.
    pub fn shard_of_stream(&self, stream: &str) -> Option<Shard> {
        let prefix = stream.strip_suffix(":flush")?;
        self.shard_prefixes
            .iter()
            .position(|p| p == prefix)
            .and_then(|k| Shard::try_from(k).ok())
    }

    /// The customer index bucket of `customer` in `shard`: `<shard>:customers:<bucket>`,
    /// a sorted set of `<customer>:<dialog>` members of score 0 (written by ingest.lua and
    /// consent.lua, swept by index_sweep.lua). The bucket is the customer id's last three
    /// characters ([`customer_bucket`]), so each set stays small (a listpack) and one
    /// customer is one lexicographic range of one set per shard.
    pub fn customer_index(&self, shard: Shard, customer: i64) -> String {
        self.customer_bucket_key(shard, &customer_bucket(customer))
    }

    /// The customer index bucket named `bucket` in `shard` (see [`customer_buckets`]).
    pub fn customer_bucket_key(&self, shard: Shard, bucket: &str) -> String {
        format!("{}:customers:{bucket}", self.shard_prefixes[usize::from(shard)])
    }

    /// The earlier layout's index of `customer`'s dialogs in `shard` (dialog id → deadline,
    /// ms), still read by an erasure until such keys have expired by themselves.
    pub fn earlier_customer_index(&self, shard: Shard, customer: i64) -> String {
        format!("{}:c{customer}", self.shard_prefixes[usize::from(shard)])
    }

    /// Erasures PostgreSQL could not record, kept until it can (`erasure_record.lua`):
    /// one fixed key, in the first shard's slot.
    pub fn erasure_records(&self) -> String {
        format!("{}:erasures", self.shard_prefixes[0])
    }

    /// Dialog id → `<unix seconds> <reason>` of every dialog of the shard set aside.
    pub fn quarantine_index(&self, shard: Shard) -> String {
        format!("{}:quarantine", self.shard_prefixes[usize::from(shard)])
    }

    /// The key a replication round increments before its `WAIT`, on the shard's primary.
    pub fn replication_fence(&self, shard: Shard) -> String {
        format!("{}:replication-fence", self.shard_prefixes[usize::from(shard)])
    }

    /// A pattern matching every key of this prefix (for tests and operators' `SCAN`).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

/// The customer index bucket of `customer`: its decimal id's last three characters, as
/// ingest.lua cuts them (`string.sub(customer, -3)`).
pub fn customer_bucket(customer: i64) -> String {
    let id = customer.to_string();
    id[id.len().saturating_sub(3)..].to_owned()
}

/// Every bucket name [`customer_bucket`] can give a customer id (≥ 0): `0`–`9`, `10`–`99`
/// and `000`–`999`, 1,100 names, in the order the sweep walks them.
pub fn customer_buckets() -> impl Iterator<Item = String> {
    (0..10)
        .map(|n| n.to_string())
        .chain((10..100).map(|n| n.to_string()))
        .chain((0..1000).map(|n| format!("{n:03}")))
}

/// Shard k's hash tag: `s<k>.<j>` with the smallest j whose slot falls in the k-th
/// `SHARDS`th of the slot range.
fn shard_tag(shard: Shard) -> String {
    let width = SLOTS / SHARDS;
    let wanted = shard * width..(shard + 1) * width;
    (0u32..)
        .map(|j| format!("s{shard}.{j}"))
        .find(|tag| wanted.contains(&key_slot(tag.as_bytes())))
        .unwrap_or_else(|| format!("s{shard}"))
}

/// Redis Cluster's slot of a key's hash tag (or of the whole key when it has none):
/// CRC16/XMODEM modulo 16384, as `CLUSTER KEYSLOT` computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_arguments_are_the_keys() {
        use redis::ToRedisArgs;
        let keys = Keyspace::new("p");
        for dialog in [0, 7, 10, 1234567890, i64::MAX] {
            let written = keys.dialog_key_arg(dialog, "msgs").to_redis_args();
            assert_eq!(written, vec![keys.dialog_key(dialog, "msgs").into_bytes()]);
            assert!(keys.dialog_key(dialog, "msgs").ends_with(&format!(":d{dialog}:msgs")));
        }
        let stream = keys.flush_stream_arg(5).to_redis_args();
        assert_eq!(stream, vec![keys.flush_stream(5).into_bytes()]);
        assert!(keys.flush_stream(5).ends_with("}:flush"));
    }

    #[test]
    fn slots_match_redis() {
        // `CLUSTER KEYSLOT` answers, from Redis's documentation and a Redis 7.0 here.
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    }

    #[test]
    fn every_shard_tag_lies_in_its_own_slot_range() {
        let keys = Keyspace::new("p");
        for k in 0..SHARDS {
            let slot = key_slot(keys.flush_stream(k).as_bytes());
            assert_eq!(slot / (SLOTS / SHARDS), k, "shard {k}");
            assert_eq!(
                key_slot(keys.meta(i64::from(k)).as_bytes()),
                key_slot(keys.flush_stream_of(i64::from(k)).as_bytes())
            );
        }
    }

    #[test]
    fn dialogs_spread_evenly_over_shards_even_with_a_stride() {
        for stride in [1, 2, 10, 64, 1000] {
            let mut counts = [0u32; SHARDS as usize];
            for i in 0..64_000i64 {
                counts[usize::from(Keyspace::shard_of(i * stride))] += 1;
            }
            let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
            assert!(min > Some(800) && max < Some(1200), "stride {stride}: {min:?}..{max:?}");
        }
    }

    #[test]
    fn stream_names_give_back_their_shard() {
        let keys = Keyspace::new("p");
        assert_eq!(keys.shard_of_stream(&keys.flush_stream(17)), Some(17));
        assert_eq!(keys.shard_of_stream("p:flush"), None);
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[test]
    fn every_customer_falls_in_a_bucket_the_sweep_walks_and_ingest_cuts_the_same_name() {
        let all: std::collections::HashSet<String> = customer_buckets().collect();
        assert_eq!(all.len(), 1100);
        for customer in [0, 7, 42, 100, 1001, 123_456, i64::MAX] {
            let bucket = customer_bucket(customer);
            // string.sub(customer, -3) in ingest.lua: the last three characters.
            let id = customer.to_string();
            assert!(id.ends_with(&bucket) && bucket.len() == id.len().min(3), "{customer}");
            assert!(all.contains(&bucket), "{customer} → {bucket}");
        }
    }
}
