-- Exact counts of GET /data time ranges at a cost that does not grow with the store
-- (src/store/sql.rs, `page_range!`). Whole months of a range are counted by
-- `message_counts`; the whole hours in its partial months by these rows; only the
-- minutes at either end (at most half an hour each) from the index.
--
-- Kept exactly as `message_counts` is: by the statements that insert and delete
-- messages, from the rows they inserted or deleted, in the same shard, and deleted
-- with the partition of their hours by retention.

-- Hours since 1970-01-01 00:00 UTC: the `hour` of an hourly count row. Year 9999 is
-- ~7·10^7, well within int4.
CREATE FUNCTION messages_hour(at timestamptz) RETURNS int4
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN floor(extract(epoch FROM at) / 3600)::int4;

CREATE TABLE message_counts_hourly (
    customer_id bigint   NOT NULL,  -- -1: any customer
    language    text     NOT NULL,  -- '': any language (else lower-cased)
    hour        int4     NOT NULL,
    shard       smallint NOT NULL,
    n           bigint   NOT NULL,
    PRIMARY KEY (customer_id, language, hour, shard)
);
-- What a partition's drop deletes: the rows of its hours.
CREATE INDEX message_counts_hourly_hour ON message_counts_hourly (hour);

-- The messages stored now, counted once. The lock waits for every transaction writing
-- `messages` to end and keeps new ones out until this one commits, so no insert or
-- delete falls between this count and the statements that keep it from now on. (A
-- process of an older release keeps writing without these rows: stop them first, as
-- docs/operations.md says.)
LOCK TABLE messages IN SHARE MODE;
INSERT INTO message_counts_hourly (customer_id, language, hour, shard, n)
SELECT coalesce(customer_id, -1), coalesce(language, ''), hour, 0, count(*)
FROM (SELECT customer_id, lower(language) AS language, messages_hour(received_at) AS hour FROM messages) m
GROUP BY hour, GROUPING SETS ((customer_id, language), (customer_id), (language), ());
