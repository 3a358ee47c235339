-- The client's own id for a message (`messageId`), which makes its retries safe; NULL
-- for messages sent without one, and for every message stored before this migration.
-- Adding a nullable column without a default rewrites nothing: existing rows stay as
-- they are.
ALTER TABLE messages ADD COLUMN message_id text;
