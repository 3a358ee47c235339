-- GET /data/export (docs/design.md, "The export's order"): the order in which messages
-- became readable, for resumable syncs that never skip a late-consented dialog.
--
-- `export_epoch`: the export epoch current when the flush that stored the message
-- committed. A constant default adds the column without rewriting the table (PostgreSQL
-- 11 and later): existing rows get 0, older than every epoch an export closes.
ALTER TABLE messages ADD COLUMN export_epoch int8 NOT NULL DEFAULT 0;

-- One index range per epoch, in receivedAt order within it: a resumed export reads the
-- epochs closed since its token in (epoch, received_at, dialog_id, seq) order.
CREATE INDEX messages_export ON messages (export_epoch, received_at, dialog_id, seq);

-- The epoch flushes write now. A flush that inserts messages holds the shared advisory
-- lock of the export for its whole transaction; an export closes the epoch under the
-- exclusive one (waiting for every flush of the old epoch to commit) and increments it.
CREATE TABLE export_state (
    one   bool PRIMARY KEY DEFAULT true CHECK (one),
    epoch int8 NOT NULL
);
INSERT INTO export_state VALUES (true, 1);
