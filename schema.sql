-- session-ledger schema: the single definition of every table, index, trigger and grant.
-- Applied at every start, in one transaction, under an advisory lock; every statement is idempotent.

SELECT pg_advisory_xact_lock(7261001);

CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;

-- The event log. Rows are only ever inserted (see the trigger below).
CREATE TABLE IF NOT EXISTS events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      text        NOT NULL,
    stream_type    text        NOT NULL,
    version        integer     NOT NULL CHECK (version > 0),
    type           text        NOT NULL,
    schema_version smallint    NOT NULL CHECK (schema_version > 0),
    data           jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction: catch-up readers order by (tx_id, position) and stop below the
    -- oldest running transaction, so a late commit can never land behind a reader's checkpoint.
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    prev_hash      bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash           bytea       NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

-- (stream_id, version) is served by the unique constraint's index.
CREATE INDEX IF NOT EXISTS events_catch_up_idx ON events (tx_id, position);
CREATE INDEX IF NOT EXISTS events_type_time_idx ON events (type, occurred_at);
CREATE INDEX IF NOT EXISTS events_time_idx ON events (occurred_at);
CREATE INDEX IF NOT EXISTS events_stream_type_time_idx ON events (stream_type, occurred_at);

CREATE OR REPLACE FUNCTION events_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Record a correcting event instead of changing history.';
END
$$;

CREATE OR REPLACE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change();

CREATE OR REPLACE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change();

-- The least-privilege runtime role: INSERT and SELECT on events, nothing else. It is created only
-- when the connecting user may create roles; otherwise a superuser creates it once (README).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'session_ledger_runtime')
       AND EXISTS (SELECT 1 FROM pg_roles
                   WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        BEGIN
            CREATE ROLE session_ledger_runtime NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- another database of this cluster created it at the same moment
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'session_ledger_runtime') THEN
        REVOKE ALL ON events FROM session_ledger_runtime;
        GRANT SELECT, INSERT ON events TO session_ledger_runtime;
        GRANT SELECT ON schema_version TO session_ledger_runtime;
    END IF;
END
$$;
