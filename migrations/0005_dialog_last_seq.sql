-- The last seq stored of each dialog, kept in `dialogs` by the flush that stores it, so
-- that the lookup of a dialog Redis forgot (ingest's revival, the flusher's settling)
-- reads one `dialogs` row instead of probing every partition of `messages` for its
-- highest seq (measured: that probe made the lookup 1.4–1.8× slower with three
-- partitions, 4× with fifteen; BENCHMARKS.md). A refusal sets it to 0 (its erasure
-- deleted every message); a grant raises it to the highest seq of the messages it
-- writes, never lowers it.
ALTER TABLE dialogs ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
UPDATE dialogs d SET last_seq = m.last
FROM (SELECT dialog_id, max(seq) AS last FROM messages GROUP BY dialog_id) m
WHERE d.dialog_id = m.dialog_id;
