"""Catch-up projections for security teams and analysts: user summary, hourly stats, alerts.

Each `apply_*` folds a batch of events (gap-safe order) into its tables: load the rows the batch
touches, fold in Python, upsert. Facts an event does not carry itself (whose session ended, when
it began) come from the session's first event, which never changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ledger.events import (
    LoginFailed,
    PrincipalLocked,
    RefreshTokenReuseDetected,
    RefreshTokenRotated,
    SessionEnded,
    SessionStarted,
)
from ledger.records import RecordedEvent
from ledger.serialization import JsonValue, format_timestamp
from projections.sql.inline import statement
from projections.streams import is_principal, is_session, principal_name_of, session_id_of

Connection = psycopg.Connection[TupleRow]

BURST_FAILURES = 10
"""Failed logins from one address within BURST_WINDOW that raise a failure_burst alert."""
BURST_WINDOW = timedelta(minutes=10)

_FIRST_EVENTS = (
    "SELECT stream_id, data->>'user', occurred_at FROM events"
    " WHERE stream_id = ANY(%s) AND version = 1"
)


@dataclass(frozen=True)
class SessionOrigin:
    """Who a session belongs to and when it began (from its SessionStarted)."""

    user: str
    started_at: datetime


def session_origins(
    conn: Connection, events: Sequence[RecordedEvent], needed: Collection[str]
) -> dict[str, SessionOrigin]:
    """The origin of every session the batch starts, and of every one it holds an event of a
    `needed` type for (looked up only for those: most events are activity and rotations)."""
    origins: dict[str, SessionOrigin] = {}
    missing: set[str] = set()
    for recorded in events:
        if not is_session(recorded):
            continue
        if recorded.type == SessionStarted.type_name:
            user = recorded.event.user  # type: ignore[attr-defined]
            origins[recorded.stream_id] = SessionOrigin(user, recorded.occurred_at)
        elif recorded.type in needed:
            missing.add(recorded.stream_id)
    missing -= origins.keys()
    if missing:
        for stream_id, user, started_at in conn.execute(_FIRST_EVENTS, (list(missing),)):
            origins[stream_id] = SessionOrigin(user, started_at)
    return origins


# -- user summary ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserSummary:
    user_name: str
    sessions_started: int = 0
    open_sessions: int = 0
    last_login: datetime | None = None
    failures: int = 0
    last_failure: datetime | None = None
    locked_until: datetime | None = None


def apply_user_summary(
    conn: Connection, events: Sequence[RecordedEvent], tables: Mapping[str, str]
) -> None:
    """Fold a batch into user_summary."""
    origins = session_origins(conn, events, (SessionEnded.type_name,))
    keyed = [(user, e) for e in events if (user := _user_of(e, origins)) is not None]
    table = _Table(tables["user_summary"], UserSummary, "user_name")
    rows = table.load(conn, {user for user, _ in keyed})
    for user, recorded in keyed:
        rows[user] = _summarise(rows.get(user) or UserSummary(user), recorded)
    table.save(conn, rows.values())


def _user_of(recorded: RecordedEvent, origins: Mapping[str, SessionOrigin]) -> str | None:
    if is_principal(recorded):
        return principal_name_of(recorded.stream_id)
    if recorded.type in (SessionStarted.type_name, SessionEnded.type_name):
        return origins[recorded.stream_id].user
    return None


def _summarise(row: UserSummary, recorded: RecordedEvent) -> UserSummary:
    event, at = recorded.event, recorded.occurred_at
    if isinstance(event, SessionStarted):
        last = at if row.last_login is None else max(row.last_login, at)
        return dataclasses.replace(
            row,
            sessions_started=row.sessions_started + 1,
            open_sessions=row.open_sessions + 1,
            last_login=last,
        )
    if isinstance(event, SessionEnded):
        return dataclasses.replace(row, open_sessions=max(row.open_sessions - 1, 0))
    if isinstance(event, LoginFailed):
        return dataclasses.replace(row, failures=row.failures + 1, last_failure=at)
    if isinstance(event, PrincipalLocked):
        return dataclasses.replace(row, locked_until=event.until)
    return row


# -- hourly statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HourlyStats:
    hour: datetime
    logins: int = 0
    login_failures: int = 0
    refreshes: int = 0
    reuse_detections: int = 0
    revocations: int = 0
    idle_expiries: int = 0
    absolute_expiries: int = 0
    session_seconds: tuple[int, ...] = field(default=())


_COUNTERS = {
    SessionStarted.type_name: "logins",
    LoginFailed.type_name: "login_failures",
    RefreshTokenRotated.type_name: "refreshes",
    RefreshTokenReuseDetected.type_name: "reuse_detections",
}
_ENDINGS = {
    "logout": "revocations",
    "idle_timeout": "idle_expiries",
    "absolute_timeout": "absolute_expiries",
}


def apply_hourly_stats(
    conn: Connection, events: Sequence[RecordedEvent], tables: Mapping[str, str]
) -> None:
    """Fold a batch into hourly_stats."""
    origins = session_origins(conn, events, (SessionEnded.type_name,))
    counted = [e for e in events if e.type in _COUNTERS or e.type == SessionEnded.type_name]
    table = _Table(tables["hourly_stats"], HourlyStats, "hour")
    rows = table.load(conn, {_hour(e.occurred_at) for e in counted})
    for recorded in counted:
        hour = _hour(recorded.occurred_at)
        rows[hour] = _count(rows.get(hour) or HourlyStats(hour), recorded, origins)
    table.save(conn, rows.values())


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _count(
    row: HourlyStats, recorded: RecordedEvent, origins: Mapping[str, SessionOrigin]
) -> HourlyStats:
    counter = _COUNTERS.get(recorded.type)
    if counter is not None:
        return dataclasses.replace(row, **{counter: getattr(row, counter) + 1})
    reason = recorded.event.reason  # type: ignore[attr-defined]
    length = int((recorded.occurred_at - origins[recorded.stream_id].started_at).total_seconds())
    row = dataclasses.replace(row, session_seconds=(*row.session_seconds, length))
    ending = _ENDINGS.get(reason)
    return row if ending is None else dataclasses.replace(row, **{ending: getattr(row, ending) + 1})


# -- alerts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    position: int
    kind: str
    occurred_at: datetime
    user_name: str | None
    session_id: str | None
    ip: str | None
    details: dict[str, JsonValue]


@dataclass(frozen=True)
class AddressFailures:
    ip: str
    recent: tuple[datetime, ...] = ()
    alerted_until: datetime | None = None


def apply_alerts(
    conn: Connection, events: Sequence[RecordedEvent], tables: Mapping[str, str]
) -> None:
    """Fold a batch into alerts (and the per-address failure counts behind failure bursts)."""
    origins = session_origins(conn, events, (RefreshTokenReuseDetected.type_name,))
    failures = [e for e in events if e.type == LoginFailed.type_name and e.event.ip]  # type: ignore[attr-defined]
    addresses = _Table(tables["address_failures"], AddressFailures, "ip")
    rows = addresses.load(conn, {e.event.ip for e in failures})  # type: ignore[attr-defined]
    alerts: list[Alert] = []
    for recorded in events:
        alert = _alert(recorded, origins, rows)
        if alert is not None:
            alerts.append(alert)
    addresses.save(conn, rows.values())
    _Table(tables["alerts"], Alert, "position").save(conn, alerts)


def _alert(
    recorded: RecordedEvent,
    origins: Mapping[str, SessionOrigin],
    addresses: dict[str, AddressFailures],
) -> Alert | None:
    event, at, position = recorded.event, recorded.occurred_at, recorded.position
    if isinstance(event, RefreshTokenReuseDetected):
        origin = origins[recorded.stream_id]
        session_id = session_id_of(recorded.stream_id)
        details: dict[str, JsonValue] = {
            "presented_generation": event.presented_generation,
            "current_generation": event.current_generation,
            "first_use": event.first_use,
            "reuse": event.reuse,
        }
        ip = event.reuse.get("ip")
        return Alert(
            position,
            "reuse_detected",
            at,
            origin.user,
            session_id,
            ip if isinstance(ip, str) else None,
            details,
        )
    if isinstance(event, PrincipalLocked):
        name = principal_name_of(recorded.stream_id)
        details = {"until": format_timestamp(event.until), "failures": event.failures}
        return Alert(position, "lockout", at, name, None, None, details)
    if isinstance(event, LoginFailed) and event.ip:
        return _burst(recorded, event.ip, addresses)
    return None


def _burst(recorded: RecordedEvent, ip: str, addresses: dict[str, AddressFailures]) -> Alert | None:
    at = recorded.occurred_at
    row = addresses.get(ip) or AddressFailures(ip)
    recent = tuple(t for t in (*row.recent, at) if at - t < BURST_WINDOW)[-BURST_FAILURES:]
    quiet = row.alerted_until is None or at >= row.alerted_until
    if len(recent) < BURST_FAILURES or not quiet:
        addresses[ip] = dataclasses.replace(row, recent=recent)
        return None
    addresses[ip] = AddressFailures(ip, recent, at + BURST_WINDOW)
    details: dict[str, JsonValue] = {
        "failures": len(recent),
        "window_seconds": int(BURST_WINDOW.total_seconds()),
        "since": format_timestamp(recent[0]),
    }
    name = principal_name_of(recorded.stream_id)
    return Alert(recorded.position, "failure_burst", at, name, None, ip, details)


# -- rows -----------------------------------------------------------------------------------------


class _Table:
    """Load and upsert one projection table whose rows are the fields of a dataclass."""

    def __init__(self, name: str, row: type[Any], key: str) -> None:
        self._row = row
        self._fields = [f.name for f in dataclasses.fields(row)]
        columns = ", ".join(self._fields)
        updates = ", ".join(f"{f} = EXCLUDED.{f}" for f in self._fields if f != key)
        placeholders = ", ".join(["%s"] * len(self._fields))
        # Names come from the dataclass's fields, never from input; values are parameters.
        self._load = statement(
            f"SELECT {{columns}} FROM {{table}} WHERE {key} = ANY(%s)",  # noqa: S608
            name,
            columns,
        )
        self._save = statement(
            f"INSERT INTO {{table}} ({{columns}}) VALUES ({placeholders})"  # noqa: S608
            f" ON CONFLICT ({key}) DO UPDATE SET {updates}",
            name,
            columns,
        )

    def load(self, conn: Connection, keys: Iterable[Any]) -> dict[Any, Any]:
        wanted = list(keys)
        if not wanted:
            return {}
        rows = conn.execute(self._load, (wanted,)).fetchall()
        return {row[0]: self._row(*(_from_db(v) for v in row)) for row in rows}

    def save(self, conn: Connection, rows: Iterable[Any]) -> None:
        params = [tuple(_to_db(getattr(r, f)) for f in self._fields) for r in rows]
        if params:
            with conn.cursor() as cursor:
                cursor.executemany(self._save, params)


def _from_db(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _to_db(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return Jsonb(value)
    return value
