-- rowcast.emit() (SPEC §3a): application events from SQL, inside the application's transaction.
-- Applied by `rowcast setup` in both capture modes; idempotent. Needs Postgres 14 or newer.
--
--   SELECT rowcast.emit('deployment.log', '{"line": "step 3/7"}', organization_id => 'quant');
--
-- The event exists if and only if the calling transaction commits, in its place among that
-- transaction's row changes. Replication carries it as a transactional logical decoding
-- message (prefix 'rowcast.emit'); trigger capture as an outbox row (op 'emit'). Both carry the
-- same JSON payload, which the publisher reads with one parser, so both give identical events.
--
-- Everything that can be checked here is, so a bad call fails the application's statement
-- with a clear message instead of a committed event the publisher would have to drop: the
-- type's syntax, that the mapping declares it (rowcast.event_types, written by setup from the
-- mapping's [[event]] tables), that data is an object no larger than --max-event-bytes and
-- the severity one of the five.

CREATE SCHEMA IF NOT EXISTS rowcast;

-- The mapping's declared application event types and their default severities. Replaced by
-- every setup from the mapping it is given.
CREATE TABLE IF NOT EXISTS rowcast.event_types (
    type     text PRIMARY KEY,
    severity text NOT NULL
);

-- Where rowcast.emit() sends events: to the WAL (replication) or the outbox (triggers). Set
-- by the first setup, changed only by a capture switch's transaction, which locks this table
-- NOWAIT: every emitting transaction holds a share lock on the row until it ends, so each
-- one is wholly before the switch (the old source has it) or wholly after (the new one has).
CREATE TABLE IF NOT EXISTS rowcast.emit_route (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    via       text    NOT NULL CHECK (via IN ('replication', 'triggers'))
);

-- The largest event rowcast.emit() accepts: `data` as jsonb prints it, in bytes (the
-- publisher's --max-event-bytes, written by every setup).
CREATE TABLE IF NOT EXISTS rowcast.emit_limits (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_event_bytes integer NOT NULL
);

CREATE OR REPLACE FUNCTION rowcast.emit(
    type            text,
    data            jsonb,
    organization_id text DEFAULT NULL,
    domain_id       text DEFAULT NULL,
    severity        text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    declared  text;
    route     text;
    payload   jsonb;
    max_bytes integer;
    size      integer;
BEGIN
    IF emit.type IS NULL OR emit.type !~ '^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'rowcast.emit: type % is not <entity>.<action> with each part [a-z][a-z0-9_]*',
            coalesce(quote_literal(emit.type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF emit.data IS NULL OR jsonb_typeof(emit.data) <> 'object' THEN
        RAISE EXCEPTION 'rowcast.emit: data must be a JSON object, not %',
            coalesce(jsonb_typeof(emit.data), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF emit.severity IS NOT NULL
       AND emit.severity NOT IN ('debug', 'info', 'warning', 'error', 'critical') THEN
        RAISE EXCEPTION 'rowcast.emit: severity % is not debug, info, warning, error or critical',
            quote_literal(emit.severity)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT l.max_event_bytes INTO max_bytes FROM rowcast.emit_limits l;
    size := octet_length(emit.data::text);
    IF size > max_bytes THEN
        RAISE EXCEPTION 'rowcast.emit: data is % bytes as JSON; at most % (--max-event-bytes)',
            size, max_bytes
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT t.severity INTO declared FROM rowcast.event_types t WHERE t.type = emit.type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rowcast.emit: event type % is not declared in the mapping',
            quote_literal(emit.type)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'declare it with an [[event]] table in the mapping file and run rowcast setup';
    END IF;
    SELECT r.via INTO route FROM rowcast.emit_route r FOR SHARE;
    IF route IS NULL THEN
        RAISE EXCEPTION 'rowcast.emit: no capture source is set up (run rowcast setup)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    payload := jsonb_build_object(
        'type', emit.type,
        'data', emit.data,
        'organization_id', emit.organization_id,
        'domain_id', emit.domain_id,
        'severity', coalesce(emit.severity, declared));
    IF route = 'replication' THEN
        PERFORM pg_logical_emit_message(true, 'rowcast.emit', payload::text);
    ELSE
        INSERT INTO rowcast.outbox (op, new_row) VALUES ('emit', payload::json);
        -- Numbered at commit, which also wakes the drain if it waits (rowcast.stamp_commit).
        INSERT INTO rowcast.outbox_commits (xid, seq) VALUES (pg_current_xact_id(), 0)
        ON CONFLICT (xid) DO NOTHING;
    END IF;
END
$$;
