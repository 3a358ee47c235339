-- Counter rows were a hot spot: every flush batch and every refusal updated the same
-- total and per-language rows, so concurrent transactions queued on their locks. Each
-- transaction now writes its deltas into one of 16 shards; a count is the sum of a
-- filter form's shards (at most 16 rows, one index range).
ALTER TABLE message_counts ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE message_counts DROP CONSTRAINT message_counts_pkey;
ALTER TABLE message_counts ADD PRIMARY KEY (customer_id, language, shard);
