"""Totals over the hourly_stats projection, as /metrics reports them."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import Connection

_TOTALS = """
SELECT coalesce(sum(logins), 0), coalesce(sum(login_failures), 0), coalesce(sum(refreshes), 0),
       coalesce(sum(reuse_detections), 0), coalesce(sum(revocations), 0),
       coalesce(sum(idle_expiries), 0), coalesce(sum(absolute_expiries), 0)
  FROM hourly_stats
"""


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


def hourly_totals(conn: Connection) -> HourlyTotals:
    """Sum hourly_stats over all hours."""
    row = conn.execute(_TOTALS).fetchone()
    return HourlyTotals(*(int(v) for v in row)) if row else HourlyTotals()
