-- One audit event per decision: a refusal that its request and a flusher apply at once
-- (both find no prior `dialogs` row to lock) writes its event once, since a decision's
-- time is its identity; WRITE_EVENTS inserts ON CONFLICT DO NOTHING. A unique index of a
-- partitioned table holds its partition key, `at`, which this one does.
CREATE UNIQUE INDEX consent_events_once ON consent_events (dialog_id, event, at);
