-- rowcast trigger capture (SPEC §2): the outbox, the commit order and the capture function.
-- Applied by `rowcast setup --source triggers`; idempotent. Needs Postgres 14 or newer.
--
-- Triggers on each mapped table (rowcast.install_capture) write each change into rowcast.outbox
-- (a plain table's inserts and deletes a statement at a time) as row_to_json text in a pinned
-- session (UTC, ISO, hex bytea, shortest exact floats). The drain re-shapes that the way
-- to_jsonb would (key order, numbers, json columns), so the data is byte-for-byte what logical
-- replication gives; Postgres no longer builds a jsonb value for every captured row. A
-- transaction sends an empty NOTIFY when it commits while the drain waits: a wake-up that
-- carries no row data, so the 8000-byte NOTIFY limit never matters.
--
-- Commit order: each capturing transaction registers once in rowcast.outbox_commits, and a
-- deferred trigger numbers it when it commits. A transaction that waited for another's row lock can only reach
-- its commit after that one committed, so changes of one row are numbered in commit order.
-- The publisher drains transactions in that order and deletes what it appended in the same
-- transaction as the append: a transaction that commits late is simply drained later; nothing
-- is skipped and nothing is drained twice.

CREATE SCHEMA IF NOT EXISTS rowcast;

CREATE TABLE IF NOT EXISTS rowcast.outbox (
    id           bigserial   NOT NULL,
    xid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    at           timestamptz NOT NULL DEFAULT statement_timestamp(),
    table_schema text,
    table_name   text,
    op           text        NOT NULL,
    new_row      json,
    old_row      json
);
-- Application events from rowcast.emit() (triggers/emit.sql) are outbox rows too: op 'emit',
-- the payload in new_row, no table. (Outboxes made before that get the looser columns here.)
ALTER TABLE rowcast.outbox ALTER COLUMN table_schema DROP NOT NULL,
                           ALTER COLUMN table_name DROP NOT NULL,
                           DROP CONSTRAINT IF EXISTS outbox_op_check,
                           ADD CONSTRAINT outbox_op_check
                               CHECK (op IN ('insert', 'update', 'delete', 'truncate', 'emit'));
-- One index: the drain finds rows by transaction and deletes them by (transaction, id). Outboxes
-- made before had a primary key on id and an index on xid, two index entries per captured row;
-- and jsonb rows, which cost Postgres a jsonb build per row (rewritten here while small: the
-- outbox holds only what is not drained yet).
CREATE INDEX IF NOT EXISTS outbox_xid_id ON rowcast.outbox (xid, id);
ALTER TABLE rowcast.outbox DROP CONSTRAINT IF EXISTS outbox_pkey;
DROP INDEX IF EXISTS rowcast.outbox_xid;
DO $$
BEGIN
    IF (SELECT atttypid FROM pg_attribute
         WHERE attrelid = 'rowcast.outbox'::regclass AND attname = 'new_row') = 'jsonb'::regtype THEN
        ALTER TABLE rowcast.outbox ALTER COLUMN new_row TYPE json USING new_row::json,
                                   ALTER COLUMN old_row TYPE json USING old_row::json;
    END IF;
END
$$;

CREATE SEQUENCE IF NOT EXISTS rowcast.commit_seq;
CREATE TABLE IF NOT EXISTS rowcast.outbox_commits (
    xid xid8   PRIMARY KEY,
    seq bigint NOT NULL
);

-- The capture trigger of every mapped table (see rowcast.install_capture). The arguments name
-- the mapped table, so a partition (which inherits the trigger) reports its root, as
-- replication does. As a statement trigger for INSERT or DELETE on a plain table it captures
-- the statement's rows at once, from its transition table, in the order the statement changed
-- them: one trigger call, one outbox insert and one registration per statement
-- instead of per row. Updates keep a row trigger, which pairs each new row with its old one.
CREATE OR REPLACE FUNCTION rowcast.capture() RETURNS trigger
LANGUAGE plpgsql
SET TimeZone = 'UTC'
SET DateStyle = 'ISO'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    captured bigint := 1;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO rowcast.outbox (table_schema, table_name, op)
        VALUES (TG_ARGV[0], TG_ARGV[1], 'truncate');
    ELSIF TG_LEVEL = 'STATEMENT' THEN
        -- `changed.*` is the whole row, even in a table with a column named `changed`.
        IF TG_OP = 'INSERT' THEN
            INSERT INTO rowcast.outbox (table_schema, table_name, op, new_row)
            SELECT TG_ARGV[0], TG_ARGV[1], 'insert', row_to_json(changed.*) FROM rowcast_new AS changed;
        ELSE
            INSERT INTO rowcast.outbox (table_schema, table_name, op, old_row)
            SELECT TG_ARGV[0], TG_ARGV[1], 'delete', row_to_json(changed.*) FROM rowcast_old AS changed;
        END IF;
        GET DIAGNOSTICS captured = ROW_COUNT;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO rowcast.outbox (table_schema, table_name, op, new_row)
        VALUES (TG_ARGV[0], TG_ARGV[1], 'insert', row_to_json(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO rowcast.outbox (table_schema, table_name, op, new_row, old_row)
        VALUES (TG_ARGV[0], TG_ARGV[1], 'update', row_to_json(NEW), row_to_json(OLD));
    ELSE
        INSERT INTO rowcast.outbox (table_schema, table_name, op, old_row)
        VALUES (TG_ARGV[0], TG_ARGV[1], 'delete', row_to_json(OLD));
    END IF;
    IF captured > 0 THEN
        -- Once per transaction: after the first change this is an index probe that inserts
        -- nothing (so the deferred numbering below, and its wake-up, fire once).
        INSERT INTO rowcast.outbox_commits (xid, seq) VALUES (pg_current_xact_id(), 0)
        ON CONFLICT (xid) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

-- Puts the capture triggers on `tab` (reported as `schema.name`), replacing what it had. A plain
-- table gets statement triggers for INSERT and DELETE; a partitioned table, a partition or an
-- inheritance parent keeps row triggers for them (statement triggers would miss statements
-- on its partitions or children, and they cannot have transition tables). Triggers are
-- replaced in place, and one is dropped only when it exists: DROP TRIGGER takes a lock that
-- would deadlock with the application's foreign-key checks while setup runs.
CREATE OR REPLACE FUNCTION rowcast.install_capture(tab regclass, schema_name text, table_name text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    plain boolean;
    present text[];
    args text := format('%L, %L', schema_name, table_name);
BEGIN
    SELECT c.relkind = 'r' AND NOT c.relispartition AND NOT c.relhassubclass INTO plain
      FROM pg_class c WHERE c.oid = tab;
    SELECT coalesce(array_agg(t.tgname::text), '{}') INTO present
      FROM pg_trigger t WHERE t.tgrelid = tab AND NOT t.tgisinternal;
    IF plain THEN
        EXECUTE format('CREATE OR REPLACE TRIGGER rowcast_capture AFTER UPDATE ON %s
                            FOR EACH ROW EXECUTE FUNCTION rowcast.capture(%s)', tab, args);
        EXECUTE format('CREATE OR REPLACE TRIGGER rowcast_capture_insert AFTER INSERT ON %s
                            REFERENCING NEW TABLE AS rowcast_new
                            FOR EACH STATEMENT EXECUTE FUNCTION rowcast.capture(%s)', tab, args);
        EXECUTE format('CREATE OR REPLACE TRIGGER rowcast_capture_delete AFTER DELETE ON %s
                            REFERENCING OLD TABLE AS rowcast_old
                            FOR EACH STATEMENT EXECUTE FUNCTION rowcast.capture(%s)', tab, args);
    ELSE
        EXECUTE format('CREATE OR REPLACE TRIGGER rowcast_capture AFTER INSERT OR UPDATE OR DELETE ON %s
                            FOR EACH ROW EXECUTE FUNCTION rowcast.capture(%s)', tab, args);
        IF 'rowcast_capture_insert' = ANY (present) THEN
            EXECUTE format('DROP TRIGGER rowcast_capture_insert ON %s', tab);
        END IF;
        IF 'rowcast_capture_delete' = ANY (present) THEN
            EXECUTE format('DROP TRIGGER rowcast_capture_delete ON %s', tab);
        END IF;
    END IF;
    EXECUTE format('CREATE OR REPLACE TRIGGER rowcast_capture_truncate AFTER TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION rowcast.capture(%s)', tab, args);
END
$$;

-- The wake-up lock. The drain holds it (exclusively, on its LISTEN connection) only while it
-- waits for work; while it drains it does not, and committing transactions need not wake it.
-- A NOTIFY serializes the commits that send one (Postgres holds a database-wide lock from
-- queueing the notification until the commit is flushed), which halved the insert rate of a
-- busy application; so a transaction notifies only when the drain waits.
CREATE OR REPLACE FUNCTION rowcast.wake_lock() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 125779434119525::bigint $$;  -- "rcwake" in ASCII

-- Numbers the transaction when it commits, and wakes the drain if it waits. (An application
-- that runs SET CONSTRAINTS ALL IMMEDIATE numbers its transactions at their first change
-- instead: still exactly once, but the commit order of one row's changes across such
-- transactions is then not guaranteed, and its wake-up comes from the poll timer if the drain
-- went to wait in between.)
--
-- No wake-up is missed: a transaction that finds the drain busy keeps the lock, shared, until
-- its commit is done, and the drain takes the lock before its last look at the outbox. So
-- that look comes after every commit that did not notify, and every commit after it notifies
-- (a shared try fails while the drain holds the lock or waits for it).
CREATE OR REPLACE FUNCTION rowcast.stamp_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rowcast.outbox_commits SET seq = nextval('rowcast.commit_seq') WHERE xid = NEW.xid;
    IF NOT pg_try_advisory_xact_lock_shared(rowcast.wake_lock()) THEN
        PERFORM pg_notify('rowcast', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS stamp_commit ON rowcast.outbox;
DROP TRIGGER IF EXISTS stamp_commit ON rowcast.outbox_commits;
CREATE CONSTRAINT TRIGGER stamp_commit AFTER INSERT ON rowcast.outbox_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION rowcast.stamp_commit();
