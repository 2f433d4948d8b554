-- rowcast's own schema: the durable event log and the position of each source.
-- Applied by `rowcast setup` (and `rowcast serve` unless --no-setup); idempotent.

CREATE SCHEMA IF NOT EXISTS rowcast;

-- One row per event, in id order. `body` is the envelope exactly as delivered (SPEC §3), as
-- `text`: rowcast wrote it and never needs Postgres to check it on insert (a `json` body cost
-- a parse per event; logs made before keep their `json` column and work as they are). The
-- other columns exist to filter and trim without parsing it.
CREATE TABLE IF NOT EXISTS rowcast.events (
    id              bigint      PRIMARY KEY,
    type            text        NOT NULL,
    committed_at    timestamptz NOT NULL,
    organization_id text,
    domain_id       text,
    severity        smallint    NOT NULL,
    body            text        NOT NULL
);

-- Commit times follow ids, so a BRIN index serves retention and time ranges at a fraction of
-- a B-tree's cost per append (benches/log_row.rs). It replaces the B-tree of earlier logs.
CREATE INDEX IF NOT EXISTS events_committed_at_brin ON rowcast.events
    USING brin (committed_at) WITH (autosummarize = on);
DROP INDEX IF EXISTS rowcast.events_committed_at;

-- The last id ever given, so ids never repeat even when retention empties the log.
CREATE TABLE IF NOT EXISTS rowcast.log_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint  NOT NULL
);
INSERT INTO rowcast.log_head (last_id) VALUES (0) ON CONFLICT DO NOTHING;

-- Where each source stands. Updated in the same transaction as the events it covers, so a
-- crash between the log commit and the source acknowledgement cannot duplicate anything:
--   position_*  the last appended event's position in its source (commit LSN or outbox id,
--               index inside it); anything at or before it is dropped when re-sent.
--   progress    the source position everything before which is in the log (replication:
--               end LSN of the last complete transaction; streaming restarts there).
CREATE TABLE IF NOT EXISTS rowcast.cursors (
    source         text        PRIMARY KEY,
    position_major bigint      NOT NULL,
    position_minor bigint      NOT NULL,
    progress       bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The Postgres cluster a source was captured from (`IDENTIFY_SYSTEM`'s system identifier): a
-- source that comes back with another one was restored or recreated, and continuity cannot
-- be proven.
ALTER TABLE rowcast.cursors ADD COLUMN IF NOT EXISTS system_identifier text;

-- While a switch from trigger capture to replication is under way: the token of the switching
-- transaction's logical message, which replication skips to (everything before it is the
-- triggers' to capture).
ALTER TABLE rowcast.cursors ADD COLUMN IF NOT EXISTS skip_until_marker text;

-- Which capture source feeds the log: decided once (`--source auto` probes only the first
-- time) and changed only by an explicit switch, which drains the old source first.
CREATE TABLE IF NOT EXISTS rowcast.capture (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    source       text        NOT NULL,
    reason       text,
    decided_at   timestamptz NOT NULL DEFAULT now(),
    -- While a switch from replication to triggers is under way: its marker's token, which the
    -- slot is drained up to.
    switch_marker text
);

-- The idempotency key of an application event posted over HTTP (SPEC §3a): posting the same
-- key again answers with the original id. Unique while the original is retained; retention
-- deleting the event frees its key.
ALTER TABLE rowcast.events ADD COLUMN IF NOT EXISTS key text;
CREATE UNIQUE INDEX IF NOT EXISTS events_key ON rowcast.events (key) WHERE key IS NOT NULL;
