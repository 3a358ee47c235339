-- Retention by partition (DAPI_RETENTION; src/store/retention.rs): `messages` becomes
-- partitioned by the month (UTC) of `received_at`, so that old messages leave by whole
-- partitions dropped, never by deleting rows one by one.
--
-- No row moves and no count changes. The table as it was becomes `messages_before`, the
-- partition of everything received before `first_month` (the month after this one, or
-- after the newest message if the clock was ever ahead); monthly partitions follow it,
-- and dapi creates more ahead as time passes.
--
-- The primary key gains `received_at` (a partitioned table's unique keys must hold its
-- partition key). Staging fixes `received_at` per (dialog, seq), so a message delivered
-- twice still conflicts with itself and is stored once.
--
-- Counts gain `part`: the month (`messages_month`) of the messages a row counts. A
-- partition is dropped in the same transaction as the count rows of its months, so
-- `count` stays exact without counting the partition first. Existing count rows go to
-- the last month `messages_before` holds.
--
-- `message_partitions` lists the partitions with their bounds, kept by the transactions
-- that create and drop them: a flush skips a message older than every partition (its
-- month was dropped: it is past retention already).

-- Months since January 1970, UTC: the `part` of a count row.
CREATE FUNCTION messages_month(at timestamptz) RETURNS int4
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (extract(year FROM at AT TIME ZONE 'UTC')::int4 - 1970) * 12
       + extract(month FROM at AT TIME ZONE 'UTC')::int4 - 1;

CREATE TABLE message_partitions (
    name text        PRIMARY KEY,
    -- '-infinity' for messages_before. Indexed: a flush reads min(low) in transactions
    -- that turn sequential scans off (the erasure's), and a disabled scan in a plan
    -- costs it a JIT compile, ~1 s (BENCHMARKS.md).
    low  timestamptz NOT NULL UNIQUE,
    high timestamptz NOT NULL UNIQUE
);

ALTER TABLE messages RENAME TO messages_before;
ALTER TABLE messages_before DROP CONSTRAINT messages_pkey;
ALTER INDEX messages_newest RENAME TO messages_before_newest;
ALTER INDEX messages_language_newest RENAME TO messages_before_language_newest;
ALTER INDEX messages_customer_newest RENAME TO messages_before_customer_newest;
ALTER INDEX messages_customer_language_newest RENAME TO messages_before_customer_language_newest;

CREATE TABLE messages (
    dialog_id   bigint      NOT NULL,
    seq         bigint      NOT NULL,
    customer_id bigint      NOT NULL,
    language    text        NOT NULL,
    text        text        NOT NULL,
    received_at timestamptz NOT NULL,
    message_id  text,
    PRIMARY KEY (dialog_id, seq, received_at)
) PARTITION BY RANGE (received_at);
-- The same indexes as before, now one per partition: the old table's are attached as
-- its own, not built again.
CREATE INDEX messages_newest ON messages (received_at, dialog_id, seq);
CREATE INDEX messages_language_newest ON messages (lower(language), received_at, dialog_id, seq);
CREATE INDEX messages_customer_newest ON messages (customer_id, received_at, dialog_id, seq);
CREATE INDEX messages_customer_language_newest ON messages (customer_id, lower(language), received_at, dialog_id, seq);

DO $$
DECLARE
    newest timestamp := (SELECT max(received_at) AT TIME ZONE 'UTC' FROM messages_before);
    first_month timestamp := date_trunc('month', greatest(now() AT TIME ZONE 'UTC', newest)) + interval '1 month';
    low timestamp;
BEGIN
    EXECUTE format('ALTER TABLE messages ATTACH PARTITION messages_before FOR VALUES FROM (MINVALUE) TO (%L)',
                   first_month AT TIME ZONE 'UTC');
    INSERT INTO message_partitions VALUES ('messages_before', '-infinity', first_month AT TIME ZONE 'UTC');
    FOR i IN 0..1 LOOP
        low := first_month + make_interval(months => i);
        EXECUTE format('CREATE TABLE %I PARTITION OF messages FOR VALUES FROM (%L) TO (%L)',
                       'messages_' || to_char(low, 'YYYYMM'), low AT TIME ZONE 'UTC',
                       (low + interval '1 month') AT TIME ZONE 'UTC');
        INSERT INTO message_partitions
        VALUES ('messages_' || to_char(low, 'YYYYMM'), low AT TIME ZONE 'UTC', (low + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
    EXECUTE format('ALTER TABLE message_counts ADD COLUMN part int4 NOT NULL DEFAULT %s',
                   messages_month(first_month AT TIME ZONE 'UTC') - 1);
END $$;

ALTER TABLE message_counts ALTER COLUMN part DROP DEFAULT;
ALTER TABLE message_counts DROP CONSTRAINT message_counts_pkey;
ALTER TABLE message_counts ADD PRIMARY KEY (customer_id, language, part, shard);
-- What a partition's drop deletes: the count rows of its months.
CREATE INDEX message_counts_part ON message_counts (part);
