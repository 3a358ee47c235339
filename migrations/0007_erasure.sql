-- Erasing a customer, and proving it (docs/design.md, "Erasing a customer").
--
-- `dialogs` by customer: an erasure lists the dialogs PostgreSQL holds of its customer
-- (those Redis forgot included) with an index scan, never a scan of the table.
-- `erased_at`: when the latest refusal or customer erasure covering the dialog finished
-- its erasure in PostgreSQL (GET /consents/{dialogId}).
CREATE INDEX dialogs_customer ON dialogs (customer_id, dialog_id);
ALTER TABLE dialogs ADD COLUMN erased_at timestamptz;

-- One row per DELETE /customers/{customerId}: the receipt. At most one pending erasure
-- per customer (a repeated DELETE answers the pending one's receipt); the flush reads
-- the pending ones of its batch's customers through the same partial index.
CREATE TABLE erasures (
    erasure_id   uuid        PRIMARY KEY,
    customer_id  bigint      NOT NULL,
    status       text        NOT NULL CHECK (status IN ('pending', 'completed')),
    requested_at timestamptz NOT NULL,
    completed_at timestamptz,
    -- Dialogs from which it removed at least one message, and the distinct messages
    -- (by dialog and seq) it removed from Redis and PostgreSQL together.
    dialogs      bigint      NOT NULL DEFAULT 0,
    messages     bigint      NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX erasures_pending ON erasures (customer_id) WHERE status = 'pending';
CREATE INDEX erasures_completed ON erasures (completed_at) WHERE status = 'completed';

-- The consent and erasure trail (GET /audit): never a text, a language or a messageId.
CREATE TABLE consent_events (
    event_id    bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL,
    event       text        NOT NULL CHECK (event IN ('granted', 'refused', 'customer_erased', 'retention')),
    customer_id bigint,
    dialog_id   bigint,
    messages    bigint,
    erasure_id  uuid
);
CREATE INDEX consent_events_newest ON consent_events (at, event_id);
CREATE INDEX consent_events_customer ON consent_events (customer_id, at, event_id);
CREATE INDEX consent_events_dialog ON consent_events (dialog_id, at, event_id);
