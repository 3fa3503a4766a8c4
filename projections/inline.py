"""The inline projections: session and principal rows, written with the events they reflect.

Callers load a row `FOR UPDATE` inside their transaction, decide, append the events with
`EventStore.append(conn=...)` and save the folded state in the same transaction, so a row never
disagrees with its stream and concurrent requests for one session queue on the row lock.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ledger.serialization import JsonValue, format_timestamp, parse_timestamp
from projections.principal import PrincipalState
from projections.session import Rotation, SessionState

Connection = psycopg.Connection[TupleRow]

_SESSION_COLUMNS = (
    "session_id, version, user_name, client_id, scope, started_at, last_activity, generation,"
    " rotations, ip, user_agent, ended_at, end_reason"
)
_LOAD_SESSION = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = %s"  # noqa: S608
_SAVE_SESSION = f"""
INSERT INTO sessions ({_SESSION_COLUMNS})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (session_id) DO UPDATE SET
    version = EXCLUDED.version, last_activity = EXCLUDED.last_activity,
    generation = EXCLUDED.generation, rotations = EXCLUDED.rotations,
    ended_at = EXCLUDED.ended_at, end_reason = EXCLUDED.end_reason
"""  # noqa: S608
_USER_SESSIONS = (
    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_name = %s"  # noqa: S608
    " ORDER BY started_at DESC, session_id LIMIT %s"
)
_LOAD_PRINCIPAL = (
    "SELECT name, version, recent_failures, locked_until FROM principals WHERE name = %s"
)
# Two-key form: the first key keeps these locks apart from the schema's and the signing keys'.
_LOCK_PRINCIPAL = "SELECT pg_advisory_xact_lock(7261002, hashtext(%s))"
_SAVE_PRINCIPAL = """
INSERT INTO principals (name, version, recent_failures, locked_until) VALUES (%s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
    version = EXCLUDED.version, recent_failures = EXCLUDED.recent_failures,
    locked_until = EXCLUDED.locked_until
"""


def load_session(conn: Connection, session_id: str, *, for_update: bool) -> SessionState | None:
    """The session's projected state; with `for_update`, locked until the transaction ends."""
    query = _LOAD_SESSION + (" FOR UPDATE" if for_update else "")
    row = conn.execute(query, (session_id,), prepare=True).fetchone()
    return None if row is None else _session(row)


def save_session(conn: Connection, state: SessionState) -> None:
    """Write the session's folded state (insert or replace)."""
    rotations: list[JsonValue] = [
        {
            "retired_generation": r.retired_generation,
            "at": format_timestamp(r.at),
            "ip": r.ip,
            "user_agent": r.user_agent,
        }
        for r in state.rotations
    ]
    params = (
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
    )
    conn.execute(_SAVE_SESSION, params, prepare=True)


def user_sessions(conn: Connection, user: str, limit: int) -> list[SessionState]:
    """A user's sessions, newest first."""
    return [_session(row) for row in conn.execute(_USER_SESSIONS, (user, limit))]


def load_principal(conn: Connection, name: str, *, for_update: bool) -> PrincipalState:
    """The principal's projected state (empty when it never failed a login).

    With `for_update`, the name is locked until the transaction ends, whether or not it has a row
    yet: a row lock alone would let two first failures of a new name race.
    """
    if for_update:
        conn.execute(_LOCK_PRINCIPAL, (name,), prepare=True)
    row = conn.execute(_LOAD_PRINCIPAL, (name,), prepare=True).fetchone()
    if row is None:
        return PrincipalState(name=name)
    return PrincipalState(
        name=row[0], version=row[1], recent_failures=tuple(row[2]), locked_until=row[3]
    )


def save_principal(conn: Connection, state: PrincipalState) -> None:
    """Write the principal's folded state (insert or replace)."""
    params = (state.name, state.version, list(state.recent_failures), state.locked_until)
    conn.execute(_SAVE_PRINCIPAL, params, prepare=True)


def _session(row: tuple[Any, ...]) -> SessionState:
    rotations = tuple(
        Rotation(r["retired_generation"], parse_timestamp(r["at"]), r["ip"], r["user_agent"])
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
    )
