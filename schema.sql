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

-- Appends events to one stream in a single round trip: checks the expected version, and chains
-- each event's hash to the previous one (hash = sha256(prev_hash || canonical body), where the
-- writer supplies the body). On a stale expected version it writes nothing and returns one row
-- (NULL, actual version); otherwise one row (position, version) per event. A concurrent writer
-- that wins the race makes this fail with a unique violation on events_stream_version_key.
CREATE OR REPLACE FUNCTION ledger_append(
    p_stream_id       text,
    p_stream_type     text,
    p_expected        integer,
    p_types           text[],
    p_schema_versions smallint[],
    p_data            jsonb[],
    p_metadata        jsonb,
    p_occurred_at     timestamptz[],
    p_bodies          bytea[]
) RETURNS TABLE (event_position bigint, stream_version integer)
LANGUAGE plpgsql AS $$
DECLARE
    head_hash bytea;
BEGIN
    SELECT e.version, e.hash INTO stream_version, head_hash
      FROM events e WHERE e.stream_id = p_stream_id ORDER BY e.version DESC LIMIT 1;
    IF NOT FOUND THEN
        stream_version := 0;
        head_hash := decode(repeat('00', 32), 'hex');
    END IF;
    IF stream_version <> p_expected THEN
        event_position := NULL;
        RETURN NEXT;
        RETURN;
    END IF;
    FOR i IN 1 .. cardinality(p_types) LOOP
        stream_version := p_expected + i;
        INSERT INTO events (stream_id, stream_type, version, type, schema_version, data, metadata,
                            occurred_at, prev_hash, hash)
        VALUES (p_stream_id, p_stream_type, stream_version, p_types[i], p_schema_versions[i],
                p_data[i], p_metadata, p_occurred_at[i], head_hash,
                sha256(head_hash || p_bodies[i]))
        RETURNING events.position, events.hash INTO event_position, head_hash;
        RETURN NEXT;
    END LOOP;
END
$$;

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
