"""Totals over the hourly_stats projection, as /metrics reports them."""

from __future__ import annotations

from dataclasses import dataclass, fields

from psycopg import Connection


@dataclass(frozen=True)
class HourlyTotals:
    """Counts summed over every hour the hourly_stats projection has applied."""

    logins: int = 0
    login_failures: int = 0
    refreshes: int = 0
    reuse_detections: int = 0
    revocations: int = 0
    idle_expiries: int = 0
    absolute_expiries: int = 0


# Column names come from HourlyTotals' fields, never from input.
_TOTALS = "SELECT {} FROM hourly_stats".format(  # noqa: S608
    ", ".join(f"coalesce(sum({f.name}), 0)" for f in fields(HourlyTotals))
)


def hourly_totals(conn: Connection) -> HourlyTotals:
    """Sum hourly_stats over all hours."""
    row = conn.execute(_TOTALS).fetchone()
    return HourlyTotals(*(int(v) for v in row)) if row else HourlyTotals()
