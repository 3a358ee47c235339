-- Exact counts of GET /data time ranges at a cost that grows neither with the store nor
-- with the range (src/store/sql.rs, `page_range!`). The months wholly inside a range
-- are counted by `message_counts`; its other whole days and ten-minute slots by these
-- rows; only the minutes at either end (at most five each) from the index.
--
-- Kept exactly as `message_counts` is: by the statements that insert and delete
-- messages, from the rows they inserted or deleted, in the same shard, and deleted with
-- the partition of their time by retention.

-- Bucket `span` seconds wide since 1970-01-01 00:00 UTC that `at` falls in (for a day,
-- 86400, year 9999 is ~2.9·10^6; for ten minutes, 600, ~4.2·10^8: both within int4).
CREATE FUNCTION messages_bucket(at timestamptz, span int4) RETURNS int4
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN floor(extract(epoch FROM at) / span)::int4;

CREATE TABLE message_counts_fine (
    customer_id bigint   NOT NULL,  -- -1: any customer
    language    text     NOT NULL,  -- '': any language (else lower-cased)
    span        int4     NOT NULL CHECK (span IN (600, 86400)),  -- seconds: a slot or a day
    bucket      int4     NOT NULL,  -- messages_bucket(received_at, span)
    shard       smallint NOT NULL,
    n           bigint   NOT NULL
);

-- The messages stored now, counted once. The lock waits for every transaction writing
-- `messages` to end and keeps new ones out until this one commits, so no insert or
-- delete falls between this count and the statements that keep it from now on. (A
-- process of an older release keeps writing without these rows: stop them first, as
-- docs/operations.md says.)
LOCK TABLE messages IN SHARE MODE;
-- Slots first, per (customer, language), binned by `date_bin` (exact, and cheaper per
-- row than `messages_bucket`'s numeric arithmetic): days and the other forms sum those
-- few rows, not the messages again; the keys are built after the rows are in
-- (BENCHMARKS.md, "Export and time ranges": the time this lock is held).
WITH binned AS (
    SELECT customer_id, lower(language) AS language, date_bin('10 minutes', received_at, 'epoch') AS start,
           count(*) AS n
    FROM messages GROUP BY 1, 2, 3
), slots AS MATERIALIZED (
    SELECT customer_id, language, messages_bucket(start, 600) AS slot, n FROM binned
)
INSERT INTO message_counts_fine (customer_id, language, span, bucket, shard, n)
SELECT coalesce(customer_id, -1), coalesce(language, ''), 600, slot, 0, sum(n)
FROM slots GROUP BY slot, GROUPING SETS ((customer_id, language), (customer_id), (language), ())
UNION ALL
SELECT coalesce(customer_id, -1), coalesce(language, ''), 86400, floor(slot / 144.0)::int4, 0, sum(n)
FROM slots GROUP BY floor(slot / 144.0)::int4, GROUPING SETS ((customer_id, language), (customer_id), (language), ());

ALTER TABLE message_counts_fine ADD PRIMARY KEY (customer_id, language, span, bucket, shard);
-- What a partition's drop deletes: the rows of its days and slots.
CREATE INDEX message_counts_fine_bucket ON message_counts_fine (span, bucket);
