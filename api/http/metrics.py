"""GET /metrics in the Prometheus text format.

Business counters come from the hourly_stats projection, so every worker reports the same totals
(as current as the catch-up runner). Request latency is measured per process.
"""

from __future__ import annotations

import bisect
import threading
import time
from datetime import datetime

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http import openapi
from ledger.db import translated_errors
from projections.sql.catalog import CATCH_UP
from projections.sql.runner import lag

router = APIRouter()
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TOTALS = """
SELECT coalesce(sum(logins), 0), coalesce(sum(login_failures), 0), coalesce(sum(refreshes), 0),
       coalesce(sum(reuse_detections), 0), coalesce(sum(revocations), 0),
       coalesce(sum(idle_expiries), 0), coalesce(sum(absolute_expiries), 0)
  FROM hourly_stats
"""
_COUNTERS = (
    ("logins", "Successful logins."),
    ("login_failures", "Failed login attempts."),
    ("refreshes", "Refresh-token rotations."),
    ("reuse_detections", "Rotated refresh tokens presented again (sessions revoked)."),
    ("revocations", "Sessions ended by logout or revocation."),
)


class Latency:
    """Request-duration histograms per route, method and status class."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], list[float]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, f"{status // 100}xx")
        with self._lock:
            counts = self._series.setdefault(key, [0.0] * (len(BUCKETS) + 2))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            counts[-1] += seconds

    def render(self) -> list[str]:
        name = "session_ledger_http_request_duration_seconds"
        lines = [f"# HELP {name} Time to answer HTTP requests.", f"# TYPE {name} histogram"]
        with self._lock:
            series = {key: list(counts) for key, counts in self._series.items()}
        for (route, method, status), counts in sorted(series.items()):
            labels = f'route="{route}",method="{method}",status="{status}"'
            cumulative = 0.0
            for bound, count in zip((*BUCKETS, "+Inf"), counts[:-1], strict=True):
                cumulative += count
                lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative:.0f}')
            lines.append(f"{name}_sum{{{labels}}} {counts[-1]:.6f}")
            lines.append(f"{name}_count{{{labels}}} {cumulative:.0f}")
        return lines


def install(app: FastAPI, latency: Latency) -> None:
    """Measure every request (by route template, so ids do not make new series)."""
    app.add_middleware(_Measure, latency=latency)


class _Measure:
    """Plain ASGI, so that measuring costs a clock read and a dictionary update per request."""

    def __init__(self, app: ASGIApp, latency: Latency) -> None:
        self._app = app
        self._latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_noting_status)
        finally:
            # Starlette's router records the route it chose in the scope: its template.
            route = str(getattr(scope.get("route"), "path", "unmatched"))
            self._latency.observe(route, scope["method"], status, time.perf_counter() - started)


@router.get("/metrics", response_class=Response, responses=openapi.METRICS_RESPONSES)
async def metrics(request: Request) -> Response:
    pool: ConnectionPool = request.app.state.pool
    now = request.app.state.service.clock()
    lines = await run_in_threadpool(_ledger_metrics, pool, now)
    lines += request.app.state.latency.render()
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _ledger_metrics(pool: ConnectionPool, now: datetime) -> list[str]:
    with translated_errors(), pool.connection() as conn:
        row = conn.execute(_TOTALS).fetchone()
        lags = {p.name: lag(conn, p, now) for p in CATCH_UP}
    totals = [int(v) for v in row] if row else [0] * 7
    lines: list[str] = []
    for (name, text), total in zip(_COUNTERS, totals, strict=False):
        metric = f"session_ledger_{name}_total"
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} counter", f"{metric} {total}"]
    metric = "session_ledger_expiries_total"
    lines += [f"# HELP {metric} Sessions ended by a timeout.", f"# TYPE {metric} counter"]
    lines += [f'{metric}{{kind="idle"}} {totals[5]}', f'{metric}{{kind="absolute"}} {totals[6]}']
    for unit, text in (("events", "Events"), ("seconds", "Age of the oldest event")):
        metric = f"session_ledger_projection_lag_{unit}"
        lines += [f"# HELP {metric} {text} not yet applied.", f"# TYPE {metric} gauge"]
        for name, behind in sorted(lags.items()):
            value = behind.events if unit == "events" else behind.seconds
            lines.append(f'{metric}{{projection="{name}"}} {value}')
    return lines
