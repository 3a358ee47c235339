//! The SQL statements of ingest, flushes, refusals, customer erasures and the audit
//! trail, reads, and the health and replica probes, written out in full, one constant
//! each and all listed in [`ALL`]. Partition management's own statements (creating and
//! dropping monthly partitions, their registries and counts) live in `retention.rs`; the
//! `SET LOCAL enable_seqscan = off` of the erasure's transactions is written where it
//! runs.
//!
//! The reads come in four forms, one per filter (see `Filter::page_statement`): none,
//! language, customer, both, so that each is planned for its own index; the audit
//! trail's likewise.
//!
//! # Plans: why statements are checked under the generic plan
//!
//! This is the one place this is explained; the rest of dapi points here.
//!
//! Every statement is planned for an index whatever the planner's mode. A prepared
//! statement runs on custom plans (made for each call's values) for its first five
//! executions, then PostgreSQL settles on its *generic* plan, made for any values, when
//! that plan's estimated cost is not above the custom ones'. A statement that is an index
//! scan for each call's values can be a sequential scan of the whole table in its
//! generic plan: the refusal's erasure once was (a join against `UNNEST`), and mixed
//! traffic fell to a sixth of its speed at 500k rows. So `tests/api/plans.rs` prepares
//! every statement in [`ALL`] on tables with realistic statistics, forces the generic
//! plan (`plan_cache_mode = force_generic_plan`) and fails on any sequential scan of
//! `messages` or `dialogs`. A new statement goes into [`ALL`] too.
//!
//! A plan must not go stale either. A generic plan made while a table was small stays in
//! a connection's statement cache as the table grows, and without an ANALYZE (autovacuum
//! off) nothing replaces it: a sequential scan of millions of rows on every refusal. So
//! the statements that look rows up by key or read a range — the lookups of decided and
//! refused dialogs and of stored messageIds, the erasure, a customer's dialogs, the
//! page, cursor and audit reads, the replica's epoch check — are
//! planned on each call (sqlx's `.persistent(false)`), and the erasure runs with
//! sequential scans off for its transaction. The other 16 stay prepared: the writes (the
//! bulk insert, the upsert, the last-seq raise, the audit events' insert), the statements
//! of the `erasures` table (a row per customer erasure), and the health, WAL and lag probes.
//! `plans_made_on_a_small_table_do_not_scan_it_once_it_is_large` in `tests/api/plans.rs`
//! runs the statements on a young store, grows it without an ANALYZE, and fails on any
//! sequential scan the same work then adds.

/// Upsert under the epoch fence; returns the dialogs whose row was written. A refusal
/// that takes erases the dialog in the same transaction: it sets `erased_at` (GET
/// /consents' `erasedAt`). A customer
/// of -1 (`CustomerId::UNKNOWN`: a refusal recorded while PostgreSQL was away) keeps the
/// stored one. `last_seq` (`$6`): a refusal sets 0 (it erases every message), a grant
/// raises it to the highest seq it writes, never lowers it.
pub const UPSERT_DIALOGS: &str = "\
INSERT INTO dialogs (dialog_id, customer_id, decision, epoch, decided_at, last_seq, erased_at)
SELECT d, c, decision, e, at, l, CASE WHEN decision = 'refused' THEN now() END
FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::timestamptz[], $6::int8[]) AS u (d, c, decision, e, at, l)
ON CONFLICT (dialog_id) DO UPDATE
SET customer_id = CASE WHEN EXCLUDED.customer_id < 0 THEN dialogs.customer_id ELSE EXCLUDED.customer_id END,
    decision = EXCLUDED.decision,
    epoch = EXCLUDED.epoch, decided_at = EXCLUDED.decided_at,
    last_seq = CASE WHEN EXCLUDED.decision = 'refused' THEN 0
                    ELSE greatest(dialogs.last_seq, EXCLUDED.last_seq) END,
    erased_at = coalesce(EXCLUDED.erased_at, dialogs.erased_at)
WHERE dialogs.epoch <= EXCLUDED.epoch
RETURNING dialog_id";

/// A flush that renumbered a dialog's messages (its claim reserved new seqs: Redis had
/// started a new life of the dialog) raises the dialog's `last_seq` to the highest of
/// them: `$1` dialogs, `$2` their highest seq. Rows already locked by the upsert.
pub const RAISE_LAST_SEQ: &str = "\
UPDATE dialogs SET last_seq = greatest(dialogs.last_seq, u.last_seq)
FROM UNNEST($1::int8[], $2::int8[]) AS u (dialog_id, last_seq)
WHERE dialogs.dialog_id = u.dialog_id";

/// The counters a statement's `changed` rows (`customer_id`, lower-cased `language`, and
/// `slot_start`, the start of their ten-minute slot) belong to — per customer and
/// language, per customer, per language, in total (`-1` / `''` mean "any") — for their
/// month (`message_counts`), their day and their slot (`message_counts_fine`), each added
/// `$sign n` in the shard `$shard`, in key order (one lock order for all writers).
/// `delta` holds the monthly rows. Rows are binned by slot first (`date_bin`, cheap) and
/// only the bins are numbered: `messages_month` and `messages_bucket` per row cost a
/// flush ~6 ms a batch of 800 (a month and a day start on a slot's boundary, so a slot's
/// start numbers them exactly).
macro_rules! count_changed {
    ($sign:literal, $shard:literal) => {
        concat!(
            ", binned AS (
    SELECT customer_id, language, messages_month(slot_start) AS part, messages_bucket(slot_start, 86400) AS day,
           messages_bucket(slot_start, 600) AS slot, n
    FROM (SELECT customer_id, language, slot_start, count(*) AS n FROM changed GROUP BY 1, 2, 3) b
), delta AS (
    SELECT part, coalesce(customer_id, -1) AS customer_id, coalesce(language, '') AS language, sum(n)::int8 AS n
    FROM binned GROUP BY part, GROUPING SETS ((customer_id, language), (customer_id), (language), ())
), bumped AS (
    INSERT INTO message_counts (customer_id, language, part, shard, n)
    SELECT customer_id, language, part, ",
            $shard,
            "::int2, ",
            $sign,
            "n FROM delta ORDER BY customer_id, language, part
    ON CONFLICT (customer_id, language, part, shard) DO UPDATE SET n = message_counts.n + EXCLUDED.n
), fine AS (
    SELECT 86400 AS span, day AS bucket, coalesce(customer_id, -1) AS customer_id,
           coalesce(language, '') AS language, sum(n)::int8 AS n
    FROM binned GROUP BY day, GROUPING SETS ((customer_id, language), (customer_id), (language), ())
    UNION ALL
    SELECT 600, slot, coalesce(customer_id, -1), coalesce(language, ''), sum(n)::int8
    FROM binned GROUP BY slot, GROUPING SETS ((customer_id, language), (customer_id), (language), ())
), bumped_fine AS (
    INSERT INTO message_counts_fine (customer_id, language, span, bucket, shard, n)
    SELECT customer_id, language, span, bucket, ",
            $shard,
            "::int2, ",
            $sign,
            "n FROM fine ORDER BY customer_id, language, span, bucket
    ON CONFLICT (customer_id, language, span, bucket, shard) DO UPDATE SET n = message_counts_fine.n + EXCLUDED.n
)"
        )
    };
}

/// Bulk insert of one batch's messages; returns how many were new. A message older than
/// every partition is skipped: retention dropped its month (see `store::retention`). The
/// same statement adds the inserted rows to every counter they belong to (`count_changed`)
/// in the shard `$8`. Each row carries the export epoch current now: the transaction holds
/// [`EXPORT_SHARED`], so the epoch cannot close before it commits (`store::export`).
pub const INSERT_MESSAGES: &str = concat!(
    "\
WITH changed AS (
    INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at, message_id, export_epoch)
    SELECT m.*, (SELECT epoch FROM export_state WHERE one)
    FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::timestamptz[], $7::text[])
        AS m (dialog_id, seq, customer_id, language, text, received_at, message_id)
    WHERE m.received_at >= (SELECT min(low) FROM message_partitions)
    ON CONFLICT (dialog_id, seq, received_at) DO NOTHING
    RETURNING customer_id, lower(language) AS language, date_bin('10 minutes', received_at, 'epoch') AS slot_start
)",
    count_changed!("", "$8"),
    "
SELECT coalesce(sum(n), 0)::int8 FROM delta WHERE customer_id = -1 AND language = ''"
);

/// `BEGIN` of a transaction that erases (a refusal's, an erasure batch's), with sequential
/// scans turned off in the same round trip: a plan made while `messages` was small would
/// otherwise scan it whole as it grows (see `ERASE_DIALOGS_ROWS`). A simple query, not
/// prepared, so not in [`ALL`].
pub const BEGIN_ERASING: &str = "BEGIN; SET LOCAL enable_seqscan = off";

/// Of the dialogs `$1` (new to Redis), every one PostgreSQL holds a decision of: a grant
/// to bring back, a refusal to keep.
pub const DECIDED_DIALOGS: &str = "\
SELECT dialog_id, customer_id, last_seq, decision = 'refused' AS refused, decided_at
FROM dialogs WHERE dialog_id = ANY($1::int8[])";

/// Of the (dialog, messageId) pairs `$1`/`$2`, those PostgreSQL holds, each with the
/// lowest seq stored under it (Guarantee 8): ingest answers them as duplicates for a
/// dialog new to Redis, and a flush drops a copy stored under another seq. One probe of
/// each partition's `messages_dialog_message_id` per pair (a LATERAL subquery, which
/// cannot become a hash join over the whole table).
pub const STORED_MESSAGE_IDS: &str = "\
SELECT u.dialog_id, u.message_id, s.seq
FROM UNNEST($1::int8[], $2::text[]) AS u (dialog_id, message_id)
CROSS JOIN LATERAL (
    SELECT min(m.seq) AS seq FROM messages m
    WHERE m.dialog_id = u.dialog_id AND m.message_id = u.message_id AND m.message_id IS NOT NULL
) s
WHERE s.seq IS NOT NULL";

/// Of the dialogs `$1` (about to be written), the decision PostgreSQL holds of each, with
/// its epoch, time and last seq, locked until the transaction ends; and, as rows with
/// `erasing` true (their customer in `dialog_id`), which of the customers `$2` have an
/// erasure pending. What the audit trail needs (was this decision written before?), the
/// refusals a grant replaces (a message received before its dialog's refusal was erased
/// by it and never comes back), and the customers whose states wait for their erasure:
/// one round trip.
pub const PRIOR_DECISIONS: &str = "\
WITH prior AS (
    SELECT dialog_id, decision = 'refused' AS refused, epoch, decided_at, last_seq FROM dialogs
    WHERE dialog_id = ANY($1::int8[]) ORDER BY dialog_id FOR UPDATE
)
SELECT dialog_id, refused, epoch, decided_at, last_seq, false AS erasing FROM prior
UNION ALL
SELECT customer_id, false, 0, now(), 0, true FROM erasures WHERE customer_id = ANY($2::int8[]) AND status = 'pending'";

/// Of the dialogs `$1` (grants the fence turned away), the newer decision PostgreSQL
/// holds of each: its kind, epoch and when its dialog was last erased, for Redis to take
/// back what a failover lost.
pub const NEWER_DECISIONS: &str = "\
SELECT dialog_id, decision = 'refused' AS refused, epoch, erased_at FROM dialogs WHERE dialog_id = ANY($1::int8[])";

/// The erasure both erasing statements share: every message of the dialogs `$1` deleted,
/// and subtracted from its counters in shard `$2` (`changed`: the rows).
macro_rules! erase_dialogs {
    () => {
        concat!(
            "\
WITH changed AS (
    DELETE FROM messages WHERE dialog_id = ANY($1::int8[])
    RETURNING dialog_id, seq, customer_id, lower(language) AS language,
              date_bin('10 minutes', received_at, 'epoch') AS slot_start
)",
            count_changed!("-", "$2")
        )
    };
}

/// Erasure of refused dialogs `$1` (their refusals took): every message of them, whatever
/// its seq, subtracted from its counters in shard `$2`; answers every message
/// deleted as (dialog, seq), which the refusal's audit event and an erasure's receipt
/// count, each once with what Redis removed. `dialog_id = ANY($1)` is a primary-key index
/// scan in the generic plan too (a join against `UNNEST` was planned as a sequential scan
/// of `messages`), and the transactions that run it turn sequential scans off against a
/// stale plan (the module documentation's "Plans").
pub const ERASE_DIALOGS_ROWS: &str = concat!(erase_dialogs!(), "\nSELECT dialog_id, seq FROM changed");

/// `ERASE_DIALOGS_ROWS` for refusals, with their audit events in the same statement (one
/// round trip less for every refusal): `$3`/`$4` the (dialog, seq) pairs Redis deleted,
/// `$5`…`$8` the events (at, kind, customer, dialog). A `refused` event counts its dialog's
/// distinct seqs across both stores; any other kind (a grant the refusal overtook) counts
/// nothing. An event written already is not written again (`WRITE_EVENTS`). Answers how
/// many stored messages it deleted.
pub const ERASE_DIALOGS_AUDITED: &str = concat!(
    erase_dialogs!(),
    ", erased AS (
    SELECT dialog_id, seq FROM changed
    UNION
    SELECT * FROM UNNEST($3::int8[], $4::int8[]) AS staged (dialog_id, seq)
), audited AS (
    INSERT INTO consent_events (at, event, customer_id, dialog_id, messages)
    SELECT e.at, e.event, e.customer_id, e.dialog_id,
           CASE WHEN e.event = 'refused' THEN (SELECT count(*) FROM erased WHERE erased.dialog_id = e.dialog_id) END
    FROM UNNEST($5::timestamptz[], $6::text[], $7::int8[], $8::int8[]) AS e (at, event, customer_id, dialog_id)
    ON CONFLICT DO NOTHING
)
SELECT count(*)::int8 FROM changed"
);

/// Records erasure `$1` for customer `$2`, requested at `$3`, unless one is pending
/// already (then nothing, and `PENDING_ERASURE_OF` finds it).
pub const BEGIN_ERASURE: &str = "\
INSERT INTO erasures (erasure_id, customer_id, status, requested_at) VALUES ($1, $2, 'pending', $3)
ON CONFLICT (customer_id) WHERE status = 'pending' DO NOTHING
RETURNING erasure_id, customer_id, status, dialogs, messages, requested_at, completed_at";

/// Records erasure `$1` (customer `$2`, requested at `$3`) that Redis kept while
/// PostgreSQL was away, unless PostgreSQL holds it already or another erasure of the
/// customer is pending.
pub const ADOPT_ERASURE: &str = "\
INSERT INTO erasures (erasure_id, customer_id, status, requested_at) VALUES ($1, $2, 'pending', $3)
ON CONFLICT DO NOTHING";

/// The pending erasure of customer `$1`.
pub const PENDING_ERASURE_OF: &str = "\
SELECT erasure_id, customer_id, status, dialogs, messages, requested_at, completed_at
FROM erasures WHERE customer_id = $1 AND status = 'pending'";

/// Every pending erasure, oldest first.
pub const PENDING_ERASURES: &str = "\
SELECT erasure_id, customer_id, status, dialogs, messages, requested_at, completed_at
FROM erasures WHERE status = 'pending' ORDER BY requested_at";

/// Erasure `$1`'s receipt.
pub const ERASURE: &str = "\
SELECT erasure_id, customer_id, status, dialogs, messages, requested_at, completed_at
FROM erasures WHERE erasure_id = $1";

/// Adds to erasure `$1`'s counts (`$2` dialogs, `$3` messages); returns the new ones.
pub const RECORD_ERASURE_PROGRESS: &str = "\
UPDATE erasures SET dialogs = dialogs + $2, messages = messages + $3 WHERE erasure_id = $1
RETURNING dialogs, messages";

/// Marks erasure `$1` completed, if it is pending; returns its receipt.
pub const COMPLETE_ERASURE: &str = "\
UPDATE erasures SET status = 'completed', completed_at = now() WHERE erasure_id = $1 AND status = 'pending'
RETURNING erasure_id, customer_id, status, dialogs, messages, requested_at, completed_at";

/// Up to `$3` dialogs of customer `$1` after dialog `$2`, in id order.
pub const CUSTOMER_DIALOGS: &str = "\
SELECT dialog_id FROM dialogs WHERE customer_id = $1 AND dialog_id > $2 ORDER BY dialog_id LIMIT $3";

/// Of dialogs `$2`, those erasure `$1` has written its `refused` event for already.
pub const ERASURE_EVENTS_WRITTEN: &str = "\
SELECT dialog_id FROM consent_events WHERE dialog_id = ANY($2::int8[]) AND erasure_id = $1 AND event = 'refused'";

/// Audit events, one per element of the arrays: at, event, customer, dialog, messages,
/// erasure. An event of a decision written already (the same dialog, kind and time: two
/// transactions applied the same decision at once) is not written again.
pub const WRITE_EVENTS: &str = "\
INSERT INTO consent_events (at, event, customer_id, dialog_id, messages, erasure_id)
SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::uuid[])
ON CONFLICT DO NOTHING";

/// Where dialog `$1` stands in PostgreSQL: its decision and, counted by an index-only
/// probe of each partition's primary key, its stored messages.
pub const DIALOG_STATUS: &str = "\
SELECT d.customer_id, d.decision, d.decided_at, d.last_seq, d.erased_at,
       (SELECT count(*) FROM messages m WHERE m.dialog_id = d.dialog_id) AS stored
FROM dialogs d WHERE d.dialog_id = $1";

/// The audit trail, newest first: `$1` limit, `$2`, `$3` the position (at, event id) to
/// continue after.
pub const AUDIT_ALL: &str = "\
SELECT event_id, at, event, customer_id, dialog_id, messages, erasure_id FROM consent_events
WHERE (at, event_id) < ($2, $3) ORDER BY at DESC, event_id DESC LIMIT $1";

/// The audit trail of customer `$4`.
pub const AUDIT_BY_CUSTOMER: &str = "\
SELECT event_id, at, event, customer_id, dialog_id, messages, erasure_id FROM consent_events
WHERE customer_id = $4 AND (at, event_id) < ($2, $3) ORDER BY at DESC, event_id DESC LIMIT $1";

/// The audit trail of dialog `$4`.
pub const AUDIT_BY_DIALOG: &str = "\
SELECT event_id, at, event, customer_id, dialog_id, messages, erasure_id FROM consent_events
WHERE dialog_id = $4 AND (at, event_id) < ($2, $3) ORDER BY at DESC, event_id DESC LIMIT $1";

/// The audit trail of customer `$4` and dialog `$5` together.
pub const AUDIT_BY_CUSTOMER_DIALOG: &str = "\
SELECT event_id, at, event, customer_id, dialog_id, messages, erasure_id FROM consent_events
WHERE customer_id = $4 AND dialog_id = $5 AND (at, event_id) < ($2, $3) ORDER BY at DESC, event_id DESC LIMIT $1";

/// Completed receipts before `$1`, `$2` at a time: what `DAPI_AUDIT_RETENTION` deletes
/// of the receipts (pending ones are never deleted); the events leave by partition.
pub const DROP_OLD_RECEIPTS: &str = "\
DELETE FROM erasures WHERE erasure_id IN (
    SELECT erasure_id FROM erasures WHERE status = 'completed' AND completed_at < $1 ORDER BY completed_at LIMIT $2)";

/// Page mode, no filter: `$1` limit, `$2` offset, `$3` language, `$4` customer (both
/// NULL here; they pick the count row). Count and rows in one statement, one snapshot.
pub const PAGE_ALL: &str = "\
WITH total AS (
    SELECT coalesce((SELECT sum(n)::int8 FROM message_counts
                     WHERE customer_id = coalesce($4::int8, -1) AND language = coalesce(lower($3::text), '')), 0) AS n
)
SELECT total.n AS count, m.customer_id, m.dialog_id, m.seq, m.text, m.language, m.received_at, m.message_id
FROM total LEFT JOIN LATERAL (
    SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
    WHERE $2 < total.n AND true
    ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1 OFFSET $2
) m ON true
ORDER BY m.received_at DESC, m.dialog_id DESC, m.seq DESC";

/// Page mode by language: `$1` limit, `$2` offset, `$3` language, `$4` customer (NULL).
pub const PAGE_BY_LANGUAGE: &str = "\
WITH total AS (
    SELECT coalesce((SELECT sum(n)::int8 FROM message_counts
                     WHERE customer_id = coalesce($4::int8, -1) AND language = coalesce(lower($3::text), '')), 0) AS n
)
SELECT total.n AS count, m.customer_id, m.dialog_id, m.seq, m.text, m.language, m.received_at, m.message_id
FROM total LEFT JOIN LATERAL (
    SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
    WHERE $2 < total.n AND lower(language) = lower($3)
    ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1 OFFSET $2
) m ON true
ORDER BY m.received_at DESC, m.dialog_id DESC, m.seq DESC";

/// Page mode by customer: `$1` limit, `$2` offset, `$3` language (NULL), `$4` customer.
pub const PAGE_BY_CUSTOMER: &str = "\
WITH total AS (
    SELECT coalesce((SELECT sum(n)::int8 FROM message_counts
                     WHERE customer_id = coalesce($4::int8, -1) AND language = coalesce(lower($3::text), '')), 0) AS n
)
SELECT total.n AS count, m.customer_id, m.dialog_id, m.seq, m.text, m.language, m.received_at, m.message_id
FROM total LEFT JOIN LATERAL (
    SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
    WHERE $2 < total.n AND customer_id = $4
    ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1 OFFSET $2
) m ON true
ORDER BY m.received_at DESC, m.dialog_id DESC, m.seq DESC";

/// Page mode by customer and language: `$1` limit, `$2` offset, `$3` language, `$4` customer.
pub const PAGE_BY_CUSTOMER_LANGUAGE: &str = "\
WITH total AS (
    SELECT coalesce((SELECT sum(n)::int8 FROM message_counts
                     WHERE customer_id = coalesce($4::int8, -1) AND language = coalesce(lower($3::text), '')), 0) AS n
)
SELECT total.n AS count, m.customer_id, m.dialog_id, m.seq, m.text, m.language, m.received_at, m.message_id
FROM total LEFT JOIN LATERAL (
    SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
    WHERE $2 < total.n AND lower(language) = lower($3) AND customer_id = $4
    ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1 OFFSET $2
) m ON true
ORDER BY m.received_at DESC, m.dialog_id DESC, m.seq DESC";

/// Cursor mode, no filter: `$1` limit, `$2`–`$4` the position to continue after, `$5`
/// the exclusive lower bound of `receivedAt` (`receivedAfter`; the upper one,
/// `receivedBefore`, is folded into the position). The redundant `received_at <= $2`
/// lets PostgreSQL skip newer partitions at start-up (a row comparison does not prune);
/// older ones are read only if the page reaches them, and none before `$5`.
pub const AFTER_ALL: &str = "\
SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
WHERE (received_at, dialog_id, seq) < ($2, $3, $4) AND received_at <= $2 AND received_at > $5 AND true
ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1";

/// Cursor mode by language: `$1` limit, `$2`–`$4` the position, `$5` language, `$6` the
/// lower bound.
pub const AFTER_BY_LANGUAGE: &str = "\
SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
WHERE (received_at, dialog_id, seq) < ($2, $3, $4) AND received_at <= $2 AND received_at > $6 AND lower(language) = lower($5)
ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1";

/// Cursor mode by customer: `$1` limit, `$2`–`$4` the position, `$5` customer, `$6` the
/// lower bound.
pub const AFTER_BY_CUSTOMER: &str = "\
SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
WHERE (received_at, dialog_id, seq) < ($2, $3, $4) AND received_at <= $2 AND received_at > $6 AND customer_id = $5
ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1";

/// Cursor mode by customer and language: `$1` limit, `$2`–`$4` the position, `$5`
/// language, `$6` customer, `$7` the lower bound.
pub const AFTER_BY_CUSTOMER_LANGUAGE: &str = "\
SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
WHERE (received_at, dialog_id, seq) < ($2, $3, $4) AND received_at <= $2 AND received_at > $7 AND lower(language) = lower($5) AND customer_id = $6
ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1";

/// Page mode within a time range: the statement for one filter form (`$filter`, over
/// `$3` language and `$4` customer). `$1` limit, `$2` offset, `$5` / `$6` the exclusive
/// bounds of `receivedAt` (NULL: none). The count is exact at a cost that grows neither
/// with the store nor with the range:
///
/// - each end is cut at the nearer boundary of its ten-minute slot (`lo_cut`, `hi_cut`),
///   and the index counts the rows between the end and its cut (at most five minutes),
///   added where the cut lies outside the range, taken back where it lies inside;
/// - between the cuts: the partitions wholly inside the range (`whole`) by their monthly
///   counters (`messages_before` its months together), the other whole days by daily
///   counters, the slots left at either end (under a day each) by ten-minute counters;
/// - a range shorter than what its two cuts would count row by row is counted row by
///   row itself (`direct`): then at most ten minutes of rows either way.
///
/// Buckets are numbered `messages_bucket(at, span)`; a day holds slots `144 d` to
/// `144 d + 143`. `total` is materialised: inlined, its count ran twice.
///
/// `$7`/`$8` and `$9`/`$10` are the windows of ten minutes either side of each end (NULL
/// where the range has none), and every read of `messages` repeats its bounds in terms
/// of parameters alone: the statement is planned per call with their values, so the
/// planner leaves out every partition outside them. (The cuts are computed in the
/// statement, too late for that; with 15 partitions, planning them all cost ~2 ms.)
macro_rules! page_range {
    ($(#[$doc:meta])* $name:ident, $filter:literal) => {
        $(#[$doc])*
        pub const $name: &str = concat!(
            "WITH r AS (
    SELECT coalesce($5::timestamptz, '-infinity') AS lo, coalesce($6::timestamptz, 'infinity') AS hi
), whole AS (
    SELECT min(p.low) AS low, max(p.high) AS high FROM message_partitions p, r
    WHERE (p.low > r.lo OR r.lo = '-infinity') AND p.high <= r.hi
), slots AS (
    SELECT lo, hi,
           CASE WHEN lo > '-infinity' THEN to_timestamp(messages_bucket(lo, 600)::float8 * 600) END AS lo_slot,
           CASE WHEN hi < 'infinity' THEN to_timestamp(messages_bucket(hi, 600)::float8 * 600) END AS hi_slot
    FROM r
), ends AS (
    SELECT lo, hi,
           CASE WHEN lo < lo_slot + interval '5 min' THEN lo_slot ELSE lo_slot + interval '10 min' END AS lo_cut,
           CASE WHEN hi < hi_slot + interval '5 min' THEN hi_slot ELSE hi_slot + interval '10 min' END AS hi_cut
    FROM slots
), cuts AS (
    SELECT lo, hi,
           lo_cut IS NOT NULL AND hi_cut IS NOT NULL
             AND hi - lo <= greatest(lo - lo_cut, lo_cut - lo) + greatest(hi - hi_cut, hi_cut - hi) AS direct,
           CASE WHEN lo_cut <= lo THEN -1 ELSE 1 END AS lo_sign,
           CASE WHEN lo_cut <= lo THEN lo_cut ELSE lo + interval '1 microsecond' END AS lo_from,
           CASE WHEN lo_cut <= lo THEN lo ELSE lo_cut - interval '1 microsecond' END AS lo_to,
           CASE WHEN hi_cut <= hi THEN 1 ELSE -1 END AS hi_sign,
           CASE WHEN hi_cut <= hi THEN hi_cut ELSE hi END AS hi_from,
           CASE WHEN hi_cut <= hi THEN hi - interval '1 microsecond' ELSE hi_cut - interval '1 microsecond' END AS hi_to,
           coalesce(messages_bucket(lo_cut, 600)::int8, -2147483648) AS s1,
           coalesce(messages_bucket(hi_cut, 600)::int8, 2147483647) AS s2,
           coalesce(messages_bucket(lo_cut + interval '1 day' - interval '1 microsecond', 86400)::int8, -2147483648) AS d1,
           coalesce(messages_bucket(hi_cut, 86400)::int8, 2147483647) AS d2,
           CASE WHEN whole.low = '-infinity' THEN -2147483648 ELSE messages_bucket(whole.low, 86400) END AS w1,
           messages_bucket(whole.high, 86400) AS w2
    FROM ends, whole
), total AS MATERIALIZED (
    SELECT CASE WHEN (SELECT lo >= hi FROM r) THEN 0
                WHEN (SELECT direct FROM cuts) THEN (SELECT count(*) FROM messages WHERE ", $filter, "
                      AND received_at > (SELECT lo FROM r) AND received_at < (SELECT hi FROM r)
                      AND received_at > coalesce($5::timestamptz, '-infinity')
                      AND received_at < coalesce($6::timestamptz, 'infinity'))
                ELSE
           coalesce((SELECT sum(n)::int8 FROM message_counts, whole
                     WHERE customer_id = coalesce($4::int8, -1) AND language = coalesce(lower($3::text), '')
                       AND part >= CASE WHEN whole.low = '-infinity' THEN -2147483648 ELSE messages_month(whole.low) END
                       AND part < messages_month(whole.high)), 0)
         + coalesce((SELECT sum(f.n)::int8 FROM message_counts_fine f, cuts c
                     WHERE f.customer_id = coalesce($4::int8, -1) AND f.language = coalesce(lower($3::text), '')
                       AND f.span = 86400 AND f.bucket >= c.d1 AND f.bucket < coalesce(c.w1, c.d2)), 0)
         + coalesce((SELECT sum(f.n)::int8 FROM message_counts_fine f, cuts c
                     WHERE f.customer_id = coalesce($4::int8, -1) AND f.language = coalesce(lower($3::text), '')
                       AND f.span = 86400 AND f.bucket >= coalesce(c.w2, c.d2) AND f.bucket < c.d2), 0)
         + coalesce((SELECT sum(f.n)::int8 FROM message_counts_fine f, cuts c
                     WHERE f.customer_id = coalesce($4::int8, -1) AND f.language = coalesce(lower($3::text), '')
                       AND f.span = 600 AND f.bucket >= c.s1
                       AND f.bucket < CASE WHEN c.d1 < c.d2 THEN c.d1 * 144 ELSE c.s2 END), 0)
         + coalesce((SELECT sum(f.n)::int8 FROM message_counts_fine f, cuts c
                     WHERE f.customer_id = coalesce($4::int8, -1) AND f.language = coalesce(lower($3::text), '')
                       AND f.span = 600 AND f.bucket >= CASE WHEN c.d1 < c.d2 THEN c.d2 * 144 ELSE c.s2 END
                       AND f.bucket < c.s2), 0)
         + (SELECT lo_sign FROM cuts) * (SELECT count(*) FROM messages WHERE ", $filter, "
              AND received_at >= (SELECT lo_from FROM cuts) AND received_at <= (SELECT lo_to FROM cuts)
              AND received_at >= $7 AND received_at <= $8)
         + (SELECT hi_sign FROM cuts) * (SELECT count(*) FROM messages WHERE ", $filter, "
              AND received_at >= (SELECT hi_from FROM cuts) AND received_at <= (SELECT hi_to FROM cuts)
              AND received_at >= $9 AND received_at <= $10)
           END AS n
)
SELECT total.n AS count, m.customer_id, m.dialog_id, m.seq, m.text, m.language, m.received_at, m.message_id
FROM total LEFT JOIN LATERAL (
    SELECT customer_id, dialog_id, seq, text, language, received_at, message_id FROM messages
    WHERE $2 < total.n AND ", $filter, "
      AND received_at > (SELECT lo FROM r) AND received_at < (SELECT hi FROM r)
      AND received_at > coalesce($5::timestamptz, '-infinity') AND received_at < coalesce($6::timestamptz, 'infinity')
    ORDER BY received_at DESC, dialog_id DESC, seq DESC LIMIT $1 OFFSET $2
) m ON true
ORDER BY m.received_at DESC, m.dialog_id DESC, m.seq DESC"
        );
    };
}

page_range!(
    /// Page mode within a time range, no filter.
    PAGE_RANGE_ALL,
    "true"
);
page_range!(
    /// Page mode within a time range, by language.
    PAGE_RANGE_BY_LANGUAGE,
    "lower(language) = lower($3)"
);
page_range!(
    /// Page mode within a time range, by customer.
    PAGE_RANGE_BY_CUSTOMER,
    "customer_id = $4"
);
page_range!(
    /// Page mode within a time range, by customer and language.
    PAGE_RANGE_BY_CUSTOMER_LANGUAGE,
    "lower(language) = lower($3) AND customer_id = $4"
);

/// Taken first by every transaction that inserts messages, held until it commits: an
/// export's close of the epoch ([`EXPORT_EXCLUSIVE`]) waits for all of them. The key is
/// "dapiexpt" in ASCII.
pub const EXPORT_SHARED: &str = "SELECT pg_advisory_xact_lock_shared(7233186074509996148)";

/// The export's close of the epoch, step 1: waits for every transaction holding
/// [`EXPORT_SHARED`] (the flushes writing the current epoch) to end, and keeps new ones
/// out until this transaction commits.
pub const EXPORT_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock(7233186074509996148)";

/// Step 2: the next epoch; every message of an older one is committed.
pub const CLOSE_EPOCH: &str = "UPDATE export_state SET epoch = epoch + 1 WHERE one RETURNING epoch";

/// A fresh export's step, for one filter form (`$filter`, over `$8` and `$9`): up to
/// `$1` messages of the epochs before `$2`, after the position `$3`–`$5`, within the
/// exclusive bounds `$6`, `$7`, oldest first. The redundant `received_at >= $3` prunes
/// the partitions before the position.
macro_rules! export_window {
    ($(#[$doc:meta])* $name:ident, $filter:literal) => {
        $(#[$doc])*
        pub const $name: &str = concat!(
            "SELECT customer_id, dialog_id, seq, text, language, received_at, message_id, export_epoch FROM messages
WHERE (received_at, dialog_id, seq) > ($3, $4, $5) AND received_at >= $3 AND received_at > $6 AND received_at < $7
  AND export_epoch < $2 AND ", $filter, "
ORDER BY received_at, dialog_id, seq LIMIT $1"
        );
    };
}

export_window!(
    /// A fresh export's step, no filter.
    EXPORT_WINDOW_ALL,
    "true"
);
export_window!(
    /// A fresh export's step by language (`$8`).
    EXPORT_WINDOW_BY_LANGUAGE,
    "lower(language) = lower($8)"
);
export_window!(
    /// A fresh export's step by customer (`$8`).
    EXPORT_WINDOW_BY_CUSTOMER,
    "customer_id = $8"
);
export_window!(
    /// A fresh export's step by language (`$8`) and customer (`$9`).
    EXPORT_WINDOW_BY_CUSTOMER_LANGUAGE,
    "lower(language) = lower($8) AND customer_id = $9"
);

/// A resumed export's step: up to `$1` messages of the epochs from `$3` up to (not
/// including) `$2`, after the position (`$3` epoch, `$4`–`$6`), within the exclusive
/// bounds `$7`, `$8`, optionally of language `$9` and customer `$10`, in (epoch,
/// receivedAt, dialog, seq) order: one range of `messages_export`. An epoch holds what
/// the flushes between two exports stored, so the filters are checked on its rows.
pub const EXPORT_EPOCHS: &str = "\
SELECT customer_id, dialog_id, seq, text, language, received_at, message_id, export_epoch FROM messages
WHERE (export_epoch, received_at, dialog_id, seq) > ($3, $4, $5, $6) AND export_epoch >= $3 AND export_epoch < $2
  AND received_at > $7 AND received_at < $8
  AND ($9::text IS NULL OR lower(language) = lower($9)) AND ($10::int8 IS NULL OR customer_id = $10)
ORDER BY export_epoch, received_at, dialog_id, seq LIMIT $1";

/// Whether PostgreSQL answers (`/readyz`).
pub const PING: &str = "SELECT 1";

/// On the read server: the epoch of the last decision it holds for dialog `$1`.
pub const DIALOG_EPOCH: &str = "SELECT epoch FROM dialogs WHERE dialog_id = $1";

/// The primary's WAL position now: past every transaction committed before.
pub const WAL_WRITTEN: &str = "SELECT pg_current_wal_lsn()::text";

/// On the read replica: whether it has replayed up to `$1` (NULL: not a replica).
pub const WAL_REPLAYED: &str = "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn";

/// On the read replica: bytes of WAL it has still to replay up to `$1`, and seconds since
/// the last transaction it replayed was committed (both NULL: not a replica).
pub const REPLICA_LAG: &str = "\
SELECT pg_wal_lsn_diff($1::pg_lsn, pg_last_wal_replay_lsn())::int8 AS bytes,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS seconds";

/// Every statement above, by name: what `tests/api/plans.rs` checks (see "Plans" above).
pub const ALL: &[(&str, &str)] = &[
    ("UPSERT_DIALOGS", UPSERT_DIALOGS),
    ("INSERT_MESSAGES", INSERT_MESSAGES),
    ("RAISE_LAST_SEQ", RAISE_LAST_SEQ),
    ("DECIDED_DIALOGS", DECIDED_DIALOGS),
    ("STORED_MESSAGE_IDS", STORED_MESSAGE_IDS),
    ("PRIOR_DECISIONS", PRIOR_DECISIONS),
    ("NEWER_DECISIONS", NEWER_DECISIONS),
    ("ERASE_DIALOGS_ROWS", ERASE_DIALOGS_ROWS),
    ("ERASE_DIALOGS_AUDITED", ERASE_DIALOGS_AUDITED),
    ("BEGIN_ERASURE", BEGIN_ERASURE),
    ("ADOPT_ERASURE", ADOPT_ERASURE),
    ("PENDING_ERASURE_OF", PENDING_ERASURE_OF),
    ("PENDING_ERASURES", PENDING_ERASURES),
    ("ERASURE", ERASURE),
    ("RECORD_ERASURE_PROGRESS", RECORD_ERASURE_PROGRESS),
    ("COMPLETE_ERASURE", COMPLETE_ERASURE),
    ("CUSTOMER_DIALOGS", CUSTOMER_DIALOGS),
    ("ERASURE_EVENTS_WRITTEN", ERASURE_EVENTS_WRITTEN),
    ("WRITE_EVENTS", WRITE_EVENTS),
    ("DIALOG_STATUS", DIALOG_STATUS),
    ("AUDIT_ALL", AUDIT_ALL),
    ("AUDIT_BY_CUSTOMER", AUDIT_BY_CUSTOMER),
    ("AUDIT_BY_DIALOG", AUDIT_BY_DIALOG),
    ("AUDIT_BY_CUSTOMER_DIALOG", AUDIT_BY_CUSTOMER_DIALOG),
    ("DROP_OLD_RECEIPTS", DROP_OLD_RECEIPTS),
    ("PAGE_ALL", PAGE_ALL),
    ("PAGE_BY_LANGUAGE", PAGE_BY_LANGUAGE),
    ("PAGE_BY_CUSTOMER", PAGE_BY_CUSTOMER),
    ("PAGE_BY_CUSTOMER_LANGUAGE", PAGE_BY_CUSTOMER_LANGUAGE),
    ("AFTER_ALL", AFTER_ALL),
    ("AFTER_BY_LANGUAGE", AFTER_BY_LANGUAGE),
    ("AFTER_BY_CUSTOMER", AFTER_BY_CUSTOMER),
    ("AFTER_BY_CUSTOMER_LANGUAGE", AFTER_BY_CUSTOMER_LANGUAGE),
    ("PAGE_RANGE_ALL", PAGE_RANGE_ALL),
    ("PAGE_RANGE_BY_LANGUAGE", PAGE_RANGE_BY_LANGUAGE),
    ("PAGE_RANGE_BY_CUSTOMER", PAGE_RANGE_BY_CUSTOMER),
    ("PAGE_RANGE_BY_CUSTOMER_LANGUAGE", PAGE_RANGE_BY_CUSTOMER_LANGUAGE),
    ("EXPORT_SHARED", EXPORT_SHARED),
    ("EXPORT_EXCLUSIVE", EXPORT_EXCLUSIVE),
    ("CLOSE_EPOCH", CLOSE_EPOCH),
    ("EXPORT_WINDOW_ALL", EXPORT_WINDOW_ALL),
    ("EXPORT_WINDOW_BY_LANGUAGE", EXPORT_WINDOW_BY_LANGUAGE),
    ("EXPORT_WINDOW_BY_CUSTOMER", EXPORT_WINDOW_BY_CUSTOMER),
    ("EXPORT_WINDOW_BY_CUSTOMER_LANGUAGE", EXPORT_WINDOW_BY_CUSTOMER_LANGUAGE),
    ("EXPORT_EPOCHS", EXPORT_EPOCHS),
    ("PING", PING),
    ("DIALOG_EPOCH", DIALOG_EPOCH),
    ("WAL_WRITTEN", WAL_WRITTEN),
    ("WAL_REPLAYED", WAL_REPLAYED),
    ("REPLICA_LAG", REPLICA_LAG),
];
