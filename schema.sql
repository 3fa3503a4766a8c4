-- session-ledger schema: the single definition of every table, index, trigger and grant.
-- Applied at every start, in one transaction, under an advisory lock; every statement is idempotent.

SELECT pg_advisory_xact_lock(7261001);

CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- Raised with every change below, so that a login that may not apply it can tell it is current.
-- 2: login_throttle. 3: events_append_refused. 4: clients_changed, signing_keys_changed.
-- 5: client_lockouts; keyed client-secret hashes; clients.scopes. 6: users.name_key. 7: the
-- sessions' deadline indexes and the session-end feed's. 8: signal_streams. 9: dpop_proofs, sessions.jkt.
-- 10: clients.dpop_bound. 11: clients.redirect_uris. 12: events.recorded_at = clock_timestamp();
-- address_failures.names; users.disabled.
INSERT INTO schema_version (version) VALUES (12) ON CONFLICT DO NOTHING;

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
    -- The moment of the insert, not now() (the transaction's start): an event whose occurred_at
    -- was read inside the transaction must not look recorded before it happened.
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The writing transaction: catch-up readers order by (tx_id, position) and stop below the
    -- oldest running transaction, so a late commit can never land behind a reader's checkpoint.
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    prev_hash      bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash           bytea       NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

-- (stream_id, version) is served by the unique constraint's index.
-- Databases made before version 12 recorded now(). Altered only when it differs: ALTER TABLE
-- locks the table, and this file runs at every start.
DO $$
BEGIN
    IF (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
          JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
         WHERE d.adrelid = 'events'::regclass AND a.attname = 'recorded_at')
       IS DISTINCT FROM 'clock_timestamp()' THEN
        ALTER TABLE events ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS events_catch_up_idx ON events (tx_id, position);
CREATE INDEX IF NOT EXISTS events_type_time_idx ON events (type, occurred_at);
CREATE INDEX IF NOT EXISTS events_time_idx ON events (occurred_at);
CREATE INDEX IF NOT EXISTS events_stream_type_time_idx ON events (stream_type, occurred_at);
-- The session-end feed: session ends in the gap-safe order, and from a recording time.
CREATE INDEX IF NOT EXISTS events_session_ends_idx ON events (tx_id, position)
    WHERE type = 'SessionEnded';
CREATE INDEX IF NOT EXISTS events_session_ends_recorded_idx ON events (recorded_at)
    WHERE type = 'SessionEnded';

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

-- Accounts. Passwords are stored only as argon2id hashes; client secrets as HMAC-SHA-256 under
-- the server secret client_secret_key (older ones as argon2id until their next use).
CREATE TABLE IF NOT EXISTS users (
    name          text PRIMARY KEY CHECK (name <> ''),
    password_hash text        NOT NULL,
    scopes        text[]      NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- A disabled user keeps the account but may not log in (`users disable`).
ALTER TABLE users ADD COLUMN IF NOT EXISTS disabled boolean NOT NULL DEFAULT false;
-- The look-alike key no two users share, api.accounts.name_key in SQL: case folded (names are
-- ASCII), then I, i, 1 → l; 0 → o; m → rn (UTS #39's confusables among a name's characters).
ALTER TABLE users ADD COLUMN IF NOT EXISTS name_key text NOT NULL GENERATED ALWAYS AS
    (replace(translate(lower(name COLLATE "C"), 'i10', 'llo'), 'm', 'rn')) STORED;
DO $$
DECLARE
    alike text;
BEGIN
    -- Users created before the key existed may collide; the index cannot be built until one of
    -- each group is renamed or removed, and the error names them.
    SELECT string_agg(names, '; ' ORDER BY names COLLATE "C") INTO alike FROM (
        SELECT string_agg(quote_literal(name), ', ' ORDER BY name COLLATE "C") AS names
        FROM users GROUP BY name_key HAVING count(*) > 1
    ) AS groups;
    IF alike IS NOT NULL AND to_regclass('users_name_key_idx') IS NULL THEN
        RAISE EXCEPTION 'user names that differ only in case or by look-alike characters: %', alike
            USING HINT = 'remove all but one of each group (session-ledger users remove NAME'
                ' with the previous version) and apply the schema again';
    END IF;
END
$$;
CREATE UNIQUE INDEX IF NOT EXISTS users_name_key_idx ON users (name_key);

-- A client with a secret hash is confidential; one without is public. `scopes` are what the
-- client itself may do (tokens:introspect), not what its users' tokens carry.
CREATE TABLE IF NOT EXISTS clients (
    client_id   text PRIMARY KEY CHECK (client_id <> ''),
    secret_hash text,
    grants      text[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE clients ADD COLUMN IF NOT EXISTS scopes text[] NOT NULL DEFAULT '{}';
-- RFC 9449 §5.2's dpop_bound_access_tokens: every token request of the client needs a DPoP proof.
ALTER TABLE clients ADD COLUMN IF NOT EXISTS dpop_bound boolean NOT NULL DEFAULT false;
-- Where /oauth/authorize may send a user back with a code: exact strings (RFC 9700 §2.1).
ALTER TABLE clients ADD COLUMN IF NOT EXISTS redirect_uris text[] NOT NULL DEFAULT '{}';

-- Access-token signing keys. private_key is PKCS#8 DER, sealed (AES-256-GCM under a key derived
-- from LEDGER_KEY_ENCRYPTION_KEY) when `sealed`. A retired key stays for verification and the JWKS.
CREATE TABLE IF NOT EXISTS signing_keys (
    kid         text PRIMARY KEY,
    algorithm   text        NOT NULL,
    private_key bytea       NOT NULL,
    sealed      boolean     NOT NULL,
    created_at  timestamptz NOT NULL,
    retired_at  timestamptz
);

-- Server-side secrets other than signing keys (the refresh-token MAC key), sealed like them.
CREATE TABLE IF NOT EXISTS server_secrets (
    name       text PRIMARY KEY,
    value      bytea       NOT NULL,
    sealed     boolean     NOT NULL,
    created_at timestamptz NOT NULL
);

-- Shared Signals (SSF) event streams and their delivery state (api/signals.py). A stream's
-- creation, status changes and deletion are events on its `signal-stream:<id>` stream; this row
-- holds what delivery needs besides: the cursor (the checkpoint of the last event the receiver
-- acknowledged, or took with a 202 when pushed), poll acknowledgements ahead of the cursor, and
-- the push retry state. authorization_header is the receiver's credential for its push
-- endpoint, sealed like the signing keys; it never enters an event.
CREATE TABLE IF NOT EXISTS signal_streams (
    stream_id            text PRIMARY KEY,
    client_id            text        NOT NULL,
    method               text        NOT NULL,
    endpoint_url         text,
    authorization_header bytea,
    header_sealed        boolean     NOT NULL DEFAULT false,
    events_delivered     text[]      NOT NULL,
    description          text,
    status               text        NOT NULL CHECK (status IN ('enabled', 'paused', 'disabled')),
    reason               text,
    cursor_tx_id         bigint      NOT NULL,
    cursor_position      bigint      NOT NULL,
    acked_ahead          text[]      NOT NULL DEFAULT '{}',
    failures             integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz,
    last_error           text,
    created_at           timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS signal_streams_client ON signal_streams (client_id);

-- Inline projection of session streams, written in the same transaction as their events; every
-- column is a fold of the stream (projections/session.py) and can be rebuilt from it.
CREATE TABLE IF NOT EXISTS sessions (
    session_id    text PRIMARY KEY,
    version       integer     NOT NULL,
    user_name     text        NOT NULL,
    client_id     text        NOT NULL,
    scope         text[]      NOT NULL,
    started_at    timestamptz NOT NULL,
    last_activity timestamptz NOT NULL,
    generation    integer     NOT NULL,
    rotations     jsonb       NOT NULL,
    ip            text,
    user_agent    text,
    ended_at      timestamptz,
    end_reason    text
);
-- The thumbprint of the DPoP key a session is bound to (RFC 9449), from its SessionStarted.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS jkt text;
CREATE INDEX IF NOT EXISTS sessions_user_idx ON sessions (user_name, started_at);
-- The expiry sweeper's two deadlines, over the sessions that have not ended only.
CREATE INDEX IF NOT EXISTS sessions_idle_deadline_idx ON sessions (last_activity)
    WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS sessions_absolute_deadline_idx ON sessions (started_at)
    WHERE ended_at IS NULL;

-- Inline projection of principal streams (failed logins and lockouts).
CREATE TABLE IF NOT EXISTS principals (
    name            text PRIMARY KEY,
    version         integer       NOT NULL,
    recent_failures timestamptz[] NOT NULL,
    locked_until    timestamptz
);

-- Inline projection of client streams (failed client authentications and lockouts); `name` is
-- the client id, and the columns are those of principals, folded by the same rule.
CREATE TABLE IF NOT EXISTS client_lockouts (
    name            text PRIMARY KEY,
    version         integer       NOT NULL,
    recent_failures timestamptz[] NOT NULL,
    locked_until    timestamptz
);

-- Catch-up projections: each one's position in the gap-safe (tx_id, position) order, written in
-- the same transaction as the rows it produced.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name       text PRIMARY KEY,
    tx_id      bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Per user name: sessions and failed logins (projections/sql/summaries.py).
CREATE TABLE IF NOT EXISTS user_summary (
    user_name        text PRIMARY KEY,
    sessions_started integer NOT NULL,
    open_sessions    integer NOT NULL,  -- started and not ended by a recorded event
    last_login       timestamptz,
    failures         integer NOT NULL,
    last_failure     timestamptz,
    locked_until     timestamptz
);

-- Per hour of occurred_at (UTC), for analysts; session_seconds holds the lengths of the sessions
-- that ended in the hour (hourly_report turns them into percentiles).
CREATE TABLE IF NOT EXISTS hourly_stats (
    hour              timestamptz PRIMARY KEY,
    logins            integer   NOT NULL,
    login_failures    integer   NOT NULL,
    refreshes         integer   NOT NULL,
    reuse_detections  integer   NOT NULL,
    revocations       integer   NOT NULL,
    idle_expiries     integer   NOT NULL,
    absolute_expiries integer   NOT NULL,
    session_seconds   integer[] NOT NULL
);
CREATE OR REPLACE VIEW hourly_report AS
SELECT hour, logins, login_failures, refreshes, reuse_detections, revocations, idle_expiries,
       absolute_expiries, cardinality(session_seconds) AS sessions_ended,
       (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY s) FROM unnest(session_seconds) s)
           AS session_seconds_p50,
       (SELECT percentile_disc(0.9) WITHIN GROUP (ORDER BY s) FROM unnest(session_seconds) s)
           AS session_seconds_p90,
       (SELECT percentile_disc(0.99) WITHIN GROUP (ORDER BY s) FROM unnest(session_seconds) s)
           AS session_seconds_p99
  FROM hourly_stats;

-- Security alerts, one per raising event; address_failures tracks failed logins per address.
CREATE TABLE IF NOT EXISTS alerts (
    position    bigint PRIMARY KEY,
    kind        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    user_name   text,
    session_id  text,
    ip          text,
    details     jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_time_idx ON alerts (occurred_at);
CREATE TABLE IF NOT EXISTS address_failures (
    ip            text PRIMARY KEY,
    recent        timestamptz[] NOT NULL,
    alerted_until timestamptz
);
ALTER TABLE address_failures ADD COLUMN IF NOT EXISTS names text[] NOT NULL DEFAULT '{}';

-- The per-address login rate limit (api/throttle.py): when each address's bucket is full again.
-- Not an event log: rows are replaced on every attempt and deleted once their time has passed.
CREATE TABLE IF NOT EXISTS login_throttle (
    address text        PRIMARY KEY,
    tat     timestamptz NOT NULL
);

-- DPoP proofs seen (api/dpop.py, RFC 9449 §11.1): a proof's (key thumbprint, jti) is taken once
-- within its time slot, `slot` (its iat divided by the acceptance window) in partition slot % 4.
-- Only the current and the previous slot can hold proofs still accepted; the pruner empties a
-- partition two slots old with TRUNCATE, so storage stays bounded without DELETE.
CREATE TABLE IF NOT EXISTS dpop_proofs (
    part smallint NOT NULL CHECK (part BETWEEN 0 AND 3),
    slot bigint   NOT NULL,
    jkt  text     NOT NULL,
    jti  text     NOT NULL,
    PRIMARY KEY (part, slot, jkt, jti)
) PARTITION BY LIST (part);
CREATE TABLE IF NOT EXISTS dpop_proofs_0 PARTITION OF dpop_proofs FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS dpop_proofs_1 PARTITION OF dpop_proofs FOR VALUES IN (1);
CREATE TABLE IF NOT EXISTS dpop_proofs_2 PARTITION OF dpop_proofs FOR VALUES IN (2);
CREATE TABLE IF NOT EXISTS dpop_proofs_3 PARTITION OF dpop_proofs FOR VALUES IN (3);

-- A pipelined append (ledger.store.queue_append) calls this when it would insert no row: the
-- stream is not at the expected version, or a newer transaction wrote its head. The error aborts
-- the transaction, so what was queued after the append (its projection row) is not committed.
CREATE OR REPLACE FUNCTION events_append_refused(stream text, prev integer) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stream % is not at version % for this transaction', stream, prev
        USING ERRCODE = 'serialization_failure';
END
$$;

-- Wakes catch-up runners (LISTEN ledger_events); they also poll, so a lost wake-up only delays.
CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ledger_events', '');
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- Tells every server that clients or signing keys changed (LISTEN ledger_changes, payload: the
-- table), so that what they hold in memory is dropped at once (api.changes).
CREATE OR REPLACE FUNCTION ledger_changes_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ledger_changes', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER clients_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON clients
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_changes_notify();
CREATE OR REPLACE TRIGGER signing_keys_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON signing_keys
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_changes_notify();

-- The least-privilege runtime role: INSERT and SELECT on events and nothing more on it; it
-- reads accounts and keys and keeps the projections. It is created only
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
        GRANT SELECT ON users, clients TO session_ledger_runtime;
        -- The service creates its first key and refresh secret, and retires keys on rotation.
        GRANT SELECT, INSERT ON signing_keys, server_secrets TO session_ledger_runtime;
        GRANT UPDATE (retired_at) ON signing_keys TO session_ledger_runtime;
        GRANT SELECT, INSERT, UPDATE ON sessions, principals, client_lockouts
            TO session_ledger_runtime;
        -- A client secret hashed with argon2 is replaced by its keyed hash on first use.
        GRANT UPDATE (secret_hash) ON clients TO session_ledger_runtime;
        GRANT SELECT, INSERT, UPDATE, DELETE ON projection_checkpoints, user_summary,
            hourly_stats, alerts, address_failures TO session_ledger_runtime;
        GRANT SELECT ON hourly_report TO session_ledger_runtime;
        GRANT SELECT, INSERT, UPDATE, DELETE ON login_throttle TO session_ledger_runtime;
        GRANT SELECT, INSERT, UPDATE, DELETE ON signal_streams TO session_ledger_runtime;
        GRANT SELECT, INSERT ON dpop_proofs TO session_ledger_runtime;
        GRANT SELECT, TRUNCATE ON dpop_proofs_0, dpop_proofs_1, dpop_proofs_2, dpop_proofs_3
            TO session_ledger_runtime;
    END IF;
END
$$;
