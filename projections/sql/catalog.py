"""Every projection by name: its tables, and how a batch of events is folded into them.

`apply(store, conn, events, tables)` folds events (in gap-safe order) into the tables named by
`tables`, which maps each live table to the table to write: the live one for the catch-up runner,
a scratch copy for a rebuild. Both run the same code, so a rebuild reproduces what the runner
built. What else a fold must read of the log, it reads through `store` on `conn`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg.rows import TupleRow

from ledger.records import RecordedEvent
from ledger.store import EventStore
from projections.sql import summaries
from projections.sql.inline import SessionsRebuild, apply_principals, apply_sessions
from projections.streams import CLIENT

Connection = psycopg.Connection[TupleRow]
Apply = Callable[[EventStore, Connection, Sequence[RecordedEvent], Mapping[str, str]], None]


class Rebuilder(Protocol):
    """Folds a rebuild's events across batches and writes the scratch tables at the end."""

    def apply(self, events: Sequence[RecordedEvent]) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class Projection:
    """A named projection and the tables it owns (with each table's key columns)."""

    name: str
    tables: Mapping[str, tuple[str, ...]]
    apply: Apply
    inline: bool
    """Kept by the writers' own transactions; otherwise kept by the catch-up runner."""
    description: str
    rebuilder: Callable[[Connection, Mapping[str, str]], Rebuilder] | None = None
    """A faster way to rebuild with the same fold; without it, a rebuild applies batch by batch."""


PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        Projection(
            "sessions",
            {"sessions": ("session_id",)},
            lambda _, conn, events, tables: apply_sessions(conn, events, table=tables["sessions"]),
            True,
            "each session's state (inline)",
            lambda conn, tables: SessionsRebuild(conn, tables["sessions"]),
        ),
        Projection(
            "principals",
            {"principals": ("name",)},
            lambda _, conn, events, tables: apply_principals(
                conn, events, table=tables["principals"]
            ),
            True,
            "failed logins and locks per user name (inline)",
        ),
        Projection(
            "client_lockouts",
            {"client_lockouts": ("name",)},
            lambda _, conn, events, tables: apply_principals(
                conn, events, table=tables["client_lockouts"], stream_type=CLIENT
            ),
            True,
            "failed authentications and locks per client id (inline)",
        ),
        Projection(
            "user_summary",
            {"user_summary": ("user_name",)},
            summaries.apply_user_summary,
            False,
            "sessions, last login, failures and lock per user name",
        ),
        Projection(
            "hourly_stats",
            {"hourly_stats": ("hour",)},
            summaries.apply_hourly_stats,
            False,
            "logins, failures, refreshes, revocations, expiries and session lengths per hour",
        ),
        Projection(
            "alerts",
            {"alerts": ("position",), "address_failures": ("ip",)},
            summaries.apply_alerts,
            False,
            "security alerts: refresh-token reuse, bound sessions used without their DPoP key,"
            " replayed authorization codes, lockouts, failure bursts from one address",
        ),
    )
}

CATCH_UP = tuple(p for p in PROJECTIONS.values() if not p.inline)


def live_tables(projection: Projection) -> dict[str, str]:
    """The mapping that makes `apply` write the live tables."""
    return {table: table for table in projection.tables}
