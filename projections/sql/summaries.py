"""Catch-up projections for security teams and analysts: user summary, hourly stats, alerts.

Each `apply_*` folds a batch of events (gap-safe order) into its tables: load the rows the batch
touches, fold them with `projections.summaries`, upsert. A session's origin that the batch does
not hold comes from its first event, read through the event store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ledger.records import RecordedEvent
from ledger.store import EventStore
from projections.sql.inline import statement
from projections.summaries import (
    ALERTS_NEED,
    HOURLY_STATS_NEEDS,
    USER_SUMMARY_NEEDS,
    AddressFailures,
    Alert,
    HourlyStats,
    SessionOrigin,
    UserSummary,
    alert_for,
    by_user,
    counted,
    failing_addresses,
    hour_of,
    origins_in,
    summarise,
    tally,
)

Connection = psycopg.Connection[TupleRow]


def session_origins(
    store: EventStore, conn: Connection, events: Sequence[RecordedEvent], needed: Collection[str]
) -> dict[str, SessionOrigin]:
    """The origin of every session the batch starts, and of every one it holds an event of a
    `needed` type for."""
    origins, missing = origins_in(events, needed)
    if missing:
        origins.update(
            (first.stream_id, SessionOrigin.of(first))
            for first in store.read_first(missing, conn=conn)
        )
    return origins


def apply_user_summary(
    store: EventStore,
    conn: Connection,
    events: Sequence[RecordedEvent],
    tables: Mapping[str, str],
) -> None:
    """Fold a batch into user_summary."""
    keyed = by_user(events, session_origins(store, conn, events, USER_SUMMARY_NEEDS))
    table = _Table(tables["user_summary"], UserSummary, "user_name")
    rows = table.load(conn, {user for user, _ in keyed})
    for user, recorded in keyed:
        rows[user] = summarise(rows.get(user) or UserSummary(user), recorded)
    table.save(conn, rows.values())


def apply_hourly_stats(
    store: EventStore,
    conn: Connection,
    events: Sequence[RecordedEvent],
    tables: Mapping[str, str],
) -> None:
    """Fold a batch into hourly_stats."""
    origins = session_origins(store, conn, events, HOURLY_STATS_NEEDS)
    events = counted(events)
    table = _Table(tables["hourly_stats"], HourlyStats, "hour")
    rows = table.load(conn, {hour_of(e.occurred_at) for e in events})
    for recorded in events:
        hour = hour_of(recorded.occurred_at)
        rows[hour] = tally(rows.get(hour) or HourlyStats(hour), recorded, origins)
    table.save(conn, rows.values())


def apply_alerts(
    store: EventStore,
    conn: Connection,
    events: Sequence[RecordedEvent],
    tables: Mapping[str, str],
) -> None:
    """Fold a batch into alerts (and the per-address failure counts behind failure bursts)."""
    origins = session_origins(store, conn, events, ALERTS_NEED)
    addresses = _Table(tables["address_failures"], AddressFailures, "ip")
    rows = addresses.load(conn, failing_addresses(events))
    alerts = [a for e in events if (a := alert_for(e, origins, rows)) is not None]
    addresses.save(conn, rows.values())
    _Table(tables["alerts"], Alert, "position").save(conn, alerts)


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
