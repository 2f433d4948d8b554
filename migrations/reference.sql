-- The reference application schema: six tables an agent platform might have.
-- Applied by `rowcast migrate`; idempotent. rowcast's default mapping (config/mapping.toml)
-- maps each of them.

CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TABLE IF NOT EXISTS organizations (
    id         text        PRIMARY KEY,
    name       text        NOT NULL,
    plan       text        NOT NULL DEFAULT 'free' CHECK (plan IN ('free', 'team', 'enterprise')),
    settings   jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS domains (
    id              text        PRIMARY KEY,
    organization_id text        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name            text        NOT NULL,
    description     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS agents (
    id              text        PRIMARY KEY,
    organization_id text        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    domain_id       text        REFERENCES domains (id) ON DELETE SET NULL,
    name            text        NOT NULL,
    status          text        NOT NULL DEFAULT 'inactive'
                                CHECK (status IN ('active', 'inactive', 'paused', 'error')),
    model           text,
    config          jsonb       NOT NULL DEFAULT '{}',
    last_seen_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS instances (
    id              text        PRIMARY KEY,
    organization_id text        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    domain_id       text        REFERENCES domains (id) ON DELETE SET NULL,
    agent_id        text        REFERENCES agents (id) ON DELETE SET NULL,
    region          text        NOT NULL DEFAULT 'eu-west-1',
    status          text        NOT NULL DEFAULT 'provisioning'
                                CHECK (status IN ('provisioning', 'running', 'stopped', 'failed')),
    cpu_millis      integer     NOT NULL DEFAULT 500,
    memory_mb       integer     NOT NULL DEFAULT 512,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS deployments (
    id              text        PRIMARY KEY,
    organization_id text        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    domain_id       text        REFERENCES domains (id) ON DELETE SET NULL,
    agent_id        text        REFERENCES agents (id) ON DELETE SET NULL,
    version         text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    started_at      timestamptz,
    finished_at     timestamptz,
    error           text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id              text        PRIMARY KEY,
    organization_id text        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    email           text        NOT NULL UNIQUE,
    name            text        NOT NULL,
    role            text        NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member')),
    password_hash   text        NOT NULL,
    last_login_at   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['organizations', 'domains', 'agents', 'instances', 'deployments', 'users'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgname = 'touch_updated_at' AND tgrelid = format('public.%I', t)::regclass) THEN
            EXECUTE format('CREATE TRIGGER touch_updated_at BEFORE UPDATE ON public.%I
                            FOR EACH ROW EXECUTE FUNCTION touch_updated_at()', t);
        END IF;
    END LOOP;
END
$$;
