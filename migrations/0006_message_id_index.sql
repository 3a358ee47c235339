-- Guarantee 8: a messageId is remembered whatever happens to Redis. For a dialog new to
-- Redis, ingest's lookup asks PostgreSQL which of a request's messageIds the dialog
-- already holds, and a flush drops a copy of a messageId the dialog already holds (a retry
-- that nothing could recognise when it came). Both look a (dialog, messageId) pair up
-- here: one index per partition, holding only the messages that carry a messageId.
CREATE INDEX messages_dialog_message_id ON messages (dialog_id, message_id) WHERE message_id IS NOT NULL;
