"""The inline projections: session, principal and client-lockout rows, written with the events
they reflect.

Callers load a row `FOR UPDATE` inside their transaction, decide, append the events with
`EventStore.append(conn=...)` (or `PipelinedTransaction.append` on the event loop) and save the
folded state in the same transaction, so a row never
disagrees with its stream and concurrent requests for one session queue on the row lock. A rebuild
folds the same events with the same functions into other tables (`table=`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ledger.records import RecordedEvent
from ledger.serialization import JsonValue, format_timestamp, parse_timestamp
from ledger.store import EventStore
from projections import principal, session
from projections.principal import PrincipalState
from projections.session import Retry, Rotation, SessionState, valid_after
from projections.streams import PRINCIPAL, is_session, key_of, session_id_of, session_stream

Connection = psycopg.Connection[TupleRow]
AsyncConnection = psycopg.AsyncConnection[TupleRow]

_SESSION_COLUMNS = (
    "session_id, version, user_name, client_id, scope, started_at, last_activity, generation,"
    " rotations, ip, user_agent, ended_at, end_reason, jkt"
)
_LOAD_SESSION = "SELECT {columns} FROM {table} WHERE session_id = %s"
_LOAD_SESSIONS = "SELECT {columns} FROM {table} WHERE session_id = ANY(%s)"
_SAVE_SESSION = """
INSERT INTO {table} ({columns})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (session_id) DO UPDATE SET
    version = EXCLUDED.version, last_activity = EXCLUDED.last_activity,
    generation = EXCLUDED.generation, rotations = EXCLUDED.rotations,
    ended_at = EXCLUDED.ended_at, end_reason = EXCLUDED.end_reason
"""
_USER_SESSIONS = (
    "SELECT {columns} FROM {table} WHERE user_name = %s"
    " ORDER BY started_at DESC, session_id LIMIT %s"
)
# session.is_valid in SQL: not ended, and active and started after session.valid_after's bounds.
_VALID_USER_SESSIONS = (
    "SELECT {columns} FROM {table} WHERE user_name = %s AND ended_at IS NULL"
    " AND last_activity > %s AND started_at > %s ORDER BY started_at DESC, session_id LIMIT %s"
)
_VALID_USER_SESSIONS_BEYOND = _VALID_USER_SESSIONS.replace(
    " ORDER BY", " AND NOT (scope <@ %s::text[]) ORDER BY"
)
_VALID_CLIENT_SESSIONS = _VALID_USER_SESSIONS.replace("user_name = %s", "client_id = %s")
# The complement of session.is_valid among sessions not ended: due for their expiry's event.
# Rows a request holds are skipped: that request records the expiry itself if it finds one.
_DUE_SESSIONS = (
    "SELECT {columns} FROM {table} WHERE ended_at IS NULL"
    " AND (last_activity <= %s OR started_at <= %s) LIMIT %s FOR UPDATE SKIP LOCKED"
)
_PRINCIPAL_COLUMNS = "name, version, recent_failures, locked_until"
_LOAD_PRINCIPAL = "SELECT {columns} FROM {table} WHERE name = %s"
_LOAD_PRINCIPALS = "SELECT {columns} FROM {table} WHERE name = ANY(%s)"
# Two-key form: the first key keeps these locks apart from the schema's and the signing keys',
# and user names apart from client ids.
_LOCK_PRINCIPAL = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
_LOCK_SPACES = {"principals": 7261002, "client_lockouts": 7261003}
_SAVE_PRINCIPAL = """
INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
    version = EXCLUDED.version, recent_failures = EXCLUDED.recent_failures,
    locked_until = EXCLUDED.locked_until
"""


@functools.cache
def statement(template: str, table: str, columns: str = "") -> str:
    """A statement on `table`: projection SQL is written once and run on live or rebuild tables."""
    if not re.fullmatch(r"[a-z_]{1,63}", table):
        raise ValueError(f"not a projection table name: {table!r}")
    return template.format(table=table, columns=columns)


def load_session(
    conn: Connection, session_id: str, *, for_update: bool, table: str = "sessions"
) -> SessionState | None:
    """The session's projected state; with `for_update`, locked until the transaction ends."""
    row = conn.execute(_load_session(table, for_update), (session_id,), prepare=True).fetchone()
    return None if row is None else _session(row)


def save_session(conn: Connection, state: SessionState, *, table: str = "sessions") -> None:
    """Write the session's folded state (insert or replace)."""
    query = statement(_SAVE_SESSION, table, _SESSION_COLUMNS)
    conn.execute(query, _session_params(state), prepare=True)


async def load_session_async(
    conn: AsyncConnection, session_id: str, *, for_update: bool
) -> SessionState | None:
    """load_session on the event loop."""
    cursor = await conn.execute(_load_session("sessions", for_update), (session_id,), prepare=True)
    row = await cursor.fetchone()
    return None if row is None else _session(row)


# The scopes the session's user holds now; no row when the user no longer exists.
_HOLDER_SCOPES = (
    "SELECT u.scopes FROM sessions s JOIN users u ON u.name = s.user_name"
    " WHERE s.session_id = %s AND NOT u.disabled"
)


async def lock_session_with_holder_async(
    conn: AsyncConnection, session_id: str
) -> tuple[SessionState | None, tuple[str, ...] | None]:
    """load_session_async FOR UPDATE, and the scopes the session's user now holds (None: there
    is no such user), in one round trip on a pipelined connection. The second statement runs
    once the row lock is held, so it sees every account change committed before."""
    locked = await conn.execute(_load_session("sessions", True), (session_id,), prepare=True)
    holder = await conn.execute(_HOLDER_SCOPES, (session_id,), prepare=True)
    row, scopes = await locked.fetchone(), await holder.fetchone()
    state = None if row is None else _session(row)
    return state, None if scopes is None else tuple(scopes[0])


async def save_session_async(conn: AsyncConnection, state: SessionState) -> None:
    """save_session on the event loop; in a pipeline it is only queued."""
    query = statement(_SAVE_SESSION, "sessions", _SESSION_COLUMNS)
    await conn.execute(query, _session_params(state), prepare=True)


def _load_session(table: str, for_update: bool) -> str:
    return statement(_LOAD_SESSION, table, _SESSION_COLUMNS) + (" FOR UPDATE" if for_update else "")


def user_sessions(
    conn: Connection, user: str, limit: int, *, table: str = "sessions"
) -> list[SessionState]:
    """A user's sessions, newest first."""
    query = statement(_USER_SESSIONS, table, _SESSION_COLUMNS)
    return [_session(row) for row in conn.execute(query, (user, limit))]


def valid_user_sessions(
    conn: Connection,
    user: str,
    now: datetime,
    policy: session.Policy,
    limit: int,
    *,
    for_update: bool = False,
    beyond_scopes: Sequence[str] | None = None,
) -> list[SessionState]:
    """A user's sessions that are valid at `now`, newest first; ended and expired ones, however
    many, never crowd a valid one out of the `limit`. With `for_update`, their rows are locked
    until the transaction ends; with `beyond_scopes`, only those holding a scope outside it."""
    template = _VALID_USER_SESSIONS if beyond_scopes is None else _VALID_USER_SESSIONS_BEYOND
    query = statement(template, "sessions", _SESSION_COLUMNS)
    if for_update:
        query += " FOR UPDATE"
    params: tuple[object, ...] = (user, *valid_after(now, policy))
    if beyond_scopes is not None:
        params += (list(beyond_scopes),)
    params += (limit,)
    return [_session(row) for row in conn.execute(query, params)]


def valid_client_sessions(
    conn: Connection, client_id: str, now: datetime, policy: session.Policy, limit: int
) -> list[SessionState]:
    """The client's sessions that are valid at `now`, their rows locked (as valid_user_sessions
    with for_update)."""
    query = statement(_VALID_CLIENT_SESSIONS, "sessions", _SESSION_COLUMNS) + " FOR UPDATE"
    return [
        _session(row) for row in conn.execute(query, (client_id, *valid_after(now, policy), limit))
    ]


def apply_session_decision(
    store: EventStore,
    conn: Connection,
    state: SessionState,
    decision: session.Decision,
    metadata: Mapping[str, object],
) -> SessionState:
    """Append the decision's events with `metadata` and save the folded row, in the caller's
    transaction (which holds the row's lock); the state after."""
    if not decision.events:
        return state
    stream = session_stream(state.session_id)
    store.append(stream, state.version, decision.events, metadata, conn=conn)
    for event in decision.events:
        state = session.evolve(state, state.session_id, event)
    save_session(conn, state)
    return state


def due_sessions(
    conn: Connection, now: datetime, policy: session.Policy, limit: int
) -> list[SessionState]:
    """Up to `limit` sessions that have not ended but are no longer valid at `now`, their rows
    locked until the transaction ends (rows locked elsewhere are left out)."""
    query = statement(_DUE_SESSIONS, "sessions", _SESSION_COLUMNS)
    return [_session(row) for row in conn.execute(query, (*valid_after(now, policy), limit))]


def load_principal(
    conn: Connection, name: str, *, for_update: bool, table: str = "principals"
) -> PrincipalState:
    """The principal's projected state (empty when it never failed a login); `table`
    "client_lockouts" holds clients' (by client id).

    With `for_update`, the name is locked until the transaction ends, whether or not it has a row
    yet: a row lock alone would let two first failures of a new name race.
    """
    if for_update:
        conn.execute(_LOCK_PRINCIPAL, (_LOCK_SPACES[table], name), prepare=True)
    query = statement(_LOAD_PRINCIPAL, table, _PRINCIPAL_COLUMNS)
    row = conn.execute(query, (name,), prepare=True).fetchone()
    return PrincipalState(name=name) if row is None else _principal(row)


def save_principal(conn: Connection, state: PrincipalState, *, table: str = "principals") -> None:
    """Write the principal's folded state (insert or replace)."""
    query = statement(_SAVE_PRINCIPAL, table, _PRINCIPAL_COLUMNS)
    conn.execute(query, _principal_params(state), prepare=True)


def apply_sessions(
    conn: Connection, events: Sequence[RecordedEvent], *, table: str = "sessions"
) -> None:
    """Fold a batch of events into session rows; events a row already reflects are skipped."""
    batch = [e for e in events if is_session(e)]
    ids = list(dict.fromkeys(session_id_of(e.stream_id) for e in batch))
    if not ids:
        return
    query = statement(_LOAD_SESSIONS, table, _SESSION_COLUMNS)
    states = {row[0]: _session(row) for row in conn.execute(query, (ids,))}
    changed = _fold_sessions(states, batch)
    saves = (states[session_id] for session_id in changed)
    _save_all(conn, statement(_SAVE_SESSION, table, _SESSION_COLUMNS), saves, _session_params)


def _fold_sessions(
    states: dict[str, SessionState], events: Sequence[RecordedEvent]
) -> dict[str, None]:
    """Fold the session events into `states`, skipping what a state already reflects; the ids
    of the sessions that changed, in the order they first did."""
    changed: dict[str, None] = {}
    for recorded in events:
        if not is_session(recorded):
            continue
        session_id = session_id_of(recorded.stream_id)
        state = states.get(session_id)
        if state is not None and recorded.version <= state.version:
            continue
        states[session_id] = session.evolve(state, session_id, recorded.event)
        changed[session_id] = None
    return changed


class SessionsRebuild:
    """Folds a whole rebuild's session events in memory and writes each row once, at the end.

    The same fold as apply_sessions, without loading and saving every touched row per batch:
    a rebuild would otherwise write a long session's row once per batch it appears in.
    """

    def __init__(self, conn: Connection, table: str) -> None:
        self._conn = conn
        self._table = table
        self._states: dict[str, SessionState] = {}

    def apply(self, events: Sequence[RecordedEvent]) -> None:
        _fold_sessions(self._states, events)

    def flush(self) -> None:
        """Write every folded row into the (empty) table."""
        copy_sql = statement("COPY {table} ({columns}) FROM STDIN", self._table, _SESSION_COLUMNS)
        with self._conn.cursor().copy(copy_sql) as copy:
            for state in self._states.values():
                copy.write_row(_session_params(state))
        self._states.clear()


def apply_principals(
    conn: Connection,
    events: Sequence[RecordedEvent],
    *,
    table: str = "principals",
    stream_type: str = PRINCIPAL,
) -> None:
    """Fold a batch of events into principal rows (of user names, or with `stream_type` CLIENT
    of client ids); events a row already reflects are skipped."""
    batch = [e for e in events if e.stream_type == stream_type]
    names = list(dict.fromkeys(key_of(stream_type, e.stream_id) for e in batch))
    if not names:
        return
    query = statement(_LOAD_PRINCIPALS, table, _PRINCIPAL_COLUMNS)
    states = {name: PrincipalState(name=name) for name in names}
    states.update((row[0], _principal(row)) for row in conn.execute(query, (names,)))
    changed: dict[str, PrincipalState] = {}
    for recorded in batch:
        name = key_of(stream_type, recorded.stream_id)
        if recorded.version <= states[name].version:
            continue
        states[name] = changed[name] = principal.evolve(states[name], recorded.event)
    _save_all(
        conn,
        statement(_SAVE_PRINCIPAL, table, _PRINCIPAL_COLUMNS),
        changed.values(),
        _principal_params,
    )


def _save_all(conn: Connection, query: str, states: Iterable[Any], params: Any) -> None:
    rows = [params(state) for state in states]
    if rows:
        with conn.cursor() as cursor:
            cursor.executemany(query, rows)


def _session_params(state: SessionState) -> tuple[Any, ...]:
    rotations: list[JsonValue] = [_rotation_json(r) for r in state.rotations]
    return (
        state.session_id,
        state.version,
        state.user,
        state.client_id,
        list(state.scope),
        state.started_at,
        state.last_activity,
        state.generation,
        Jsonb(rotations),
        state.ip,
        state.user_agent,
        state.ended_at,
        state.end_reason,
        state.jkt,
    )


def _rotation_json(rotation: Rotation) -> JsonValue:
    value: dict[str, JsonValue] = {
        "retired_generation": rotation.retired_generation,
        "at": format_timestamp(rotation.at),
        "ip": rotation.ip,
        "user_agent": rotation.user_agent,
    }
    if rotation.retries:  # rare, so rows without retries keep the shape they always had
        value["retries"] = [
            {"at": format_timestamp(r.at), "ip": r.ip, "user_agent": r.user_agent}
            for r in rotation.retries
        ]
    return value


def _principal_params(state: PrincipalState) -> tuple[Any, ...]:
    return (state.name, state.version, list(state.recent_failures), state.locked_until)


def _session(row: tuple[Any, ...]) -> SessionState:
    rotations = tuple(
        Rotation(
            r["retired_generation"],
            parse_timestamp(r["at"]),
            r["ip"],
            r["user_agent"],
            tuple(
                Retry(parse_timestamp(t["at"]), t["ip"], t["user_agent"])
                for t in r.get("retries", ())
            ),
        )
        for r in row[8]
    )
    return SessionState(
        session_id=row[0],
        version=row[1],
        user=row[2],
        client_id=row[3],
        scope=tuple(row[4]),
        started_at=row[5],
        last_activity=row[6],
        generation=row[7],
        rotations=rotations,
        ip=row[9],
        user_agent=row[10],
        ended_at=row[11],
        end_reason=row[12],
        jkt=row[13],
    )


def _principal(row: tuple[Any, ...]) -> PrincipalState:
    return PrincipalState(
        name=row[0], version=row[1], recent_failures=tuple(row[2]), locked_until=row[3]
    )
