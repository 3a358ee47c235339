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
-- Partitioned by the month (UTC) of `at`, so that DAPI_AUDIT_RETENTION drops whole
-- months, never rows one by one (src/store/retention.rs). `audit_partitions` lists the
-- monthly partitions with their bounds; this month's and the next two are made here,
-- and the processes that run flushers keep two months ahead. The default partition
-- only catches an event outside every month made (a clock far off): retention never
-- drops it.
CREATE TABLE consent_events (
    event_id    bigint      GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL,
    event       text        NOT NULL CHECK (event IN ('granted', 'refused', 'customer_erased', 'retention')),
    customer_id bigint,
    dialog_id   bigint,
    messages    bigint,
    erasure_id  uuid,
    PRIMARY KEY (event_id, at)
) PARTITION BY RANGE (at);
CREATE INDEX consent_events_newest ON consent_events (at, event_id);
CREATE INDEX consent_events_customer ON consent_events (customer_id, at, event_id);
CREATE INDEX consent_events_dialog ON consent_events (dialog_id, at, event_id);
CREATE TABLE consent_events_default PARTITION OF consent_events DEFAULT;

CREATE TABLE audit_partitions (
    name text        PRIMARY KEY,
    low  timestamptz NOT NULL UNIQUE,
    high timestamptz NOT NULL UNIQUE
);

DO $$
DECLARE
    this_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    low timestamp;
BEGIN
    FOR i IN 0..2 LOOP
        low := this_month + make_interval(months => i);
        EXECUTE format('CREATE TABLE %I PARTITION OF consent_events FOR VALUES FROM (%L) TO (%L)',
                       'consent_events_' || to_char(low, 'YYYYMM'), low AT TIME ZONE 'UTC',
                       (low + interval '1 month') AT TIME ZONE 'UTC');
        INSERT INTO audit_partitions
        VALUES ('consent_events_' || to_char(low, 'YYYYMM'), low AT TIME ZONE 'UTC',
                (low + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
END $$;
