-- Consented dialogs and their messages, with the indexes that make every read an index
-- scan and the counters that make `count` exact without scanning.

-- The latest decision applied for each dialog. `epoch` is the fence: a write carrying an
-- older epoch than the stored one changes nothing (see src/store/mod.rs).
CREATE TABLE dialogs (
    dialog_id   bigint      PRIMARY KEY,
    customer_id bigint      NOT NULL,
    decision    text        NOT NULL CHECK (decision IN ('granted', 'refused')),
    epoch       bigint      NOT NULL,
    decided_at  timestamptz NOT NULL
);

-- Messages of granted dialogs only; a refusal deletes them in the same transaction that
-- records it.
CREATE TABLE messages (
    dialog_id   bigint      NOT NULL,
    seq         bigint      NOT NULL,
    customer_id bigint      NOT NULL,
    language    text        NOT NULL,
    text        text        NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (dialog_id, seq)
);

-- Newest first overall, per language (case-folded), per customer, per customer and
-- language: every filter form of GET /data is one backward index range scan.
CREATE INDEX messages_newest ON messages (received_at, dialog_id, seq);
CREATE INDEX messages_language_newest ON messages (lower(language), received_at, dialog_id, seq);
CREATE INDEX messages_customer_newest ON messages (customer_id, received_at, dialog_id, seq);
CREATE INDEX messages_customer_language_newest ON messages (customer_id, lower(language), received_at, dialog_id, seq);

-- Exact counts per filter form, kept by the same transactions that insert and delete
-- messages. `customer_id = -1` means any customer, `language = ''` any language; so the
-- row (-1, '') is the total.
CREATE TABLE message_counts (
    customer_id bigint NOT NULL,
    language    text   NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (customer_id, language)
);
