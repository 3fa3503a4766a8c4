"""GET /metrics in the Prometheus text format, through prometheus_client.

Business counters and projection lag are read from the database at scrape time, so every worker
reports the same totals (as current as the catch-up runner). Request latency is a histogram; under
`serve --workers N` each worker writes its samples to PROMETHEUS_MULTIPROC_DIR and a scrape, which
reaches one worker, sums all of them.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterator
from datetime import datetime

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from api.errors import InvalidToken
from api.http import openapi
from api.http.errors import BearerRequired
from api.signals import Signals, SignalStream
from ledger.db import translated_errors
from ledger.store import EventStore
from projections.sql.catalog import CATCH_UP
from projections.sql.runner import Lag, lag
from projections.sql.totals import HourlyTotals, hourly_totals

router = APIRouter()
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTERS = (
    ("logins", "Successful logins."),
    ("login_failures", "Failed login attempts."),
    ("refreshes", "Refresh-token rotations."),
    ("reuse_detections", "Rotated refresh tokens presented again (sessions revoked)."),
    ("revocations", "Sessions ended by logout or revocation."),
)


def latency_histogram() -> Histogram:
    """One per app and registered nowhere yet, so two apps in one process do not collide."""
    return Histogram(
        "session_ledger_http_request_duration_seconds",
        "Time to answer HTTP requests.",
        ("route", "method", "status"),
        buckets=BUCKETS,
        registry=None,
    )


def is_multiprocess() -> bool:
    # prometheus_client chose mmap-file storage from this variable when it was imported;
    # collecting has to follow the same choice.
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def registry(
    latency: Histogram, pool: ConnectionPool, clock: Callable[[], datetime], signals: Signals
) -> CollectorRegistry:
    """What /metrics renders: the latency of this app (or of every worker) and the ledger's."""
    registry = CollectorRegistry()
    if is_multiprocess():
        # prometheus_client leaves this constructor untyped.
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # every worker's files
    else:
        registry.register(latency)
    registry.register(_Ledger(pool, clock, signals))
    return registry


class _Ledger(Collector):
    """Business counters, projection lag and Shared Signals delivery lag, read from the
    database at each scrape."""

    def __init__(
        self, pool: ConnectionPool, clock: Callable[[], datetime], signals: Signals
    ) -> None:
        self._pool = pool
        self._store = EventStore(pool)
        self._clock = clock
        self._signals = signals

    def collect(self) -> Iterator[Metric]:
        with translated_errors(), self._pool.connection() as conn:
            totals = hourly_totals(conn)
            lags = {p.name: lag(self._store, conn, p, self._clock()) for p in CATCH_UP}
        yield from _counters(totals)
        yield from _lag_gauges(lags)
        yield from _signal_gauges(self._signals.lags())


def _counters(totals: HourlyTotals) -> Iterator[Metric]:
    for name, text in _COUNTERS:
        yield CounterMetricFamily(f"session_ledger_{name}", text, value=getattr(totals, name))
    expiries = CounterMetricFamily(
        "session_ledger_expiries", "Sessions ended by a timeout.", labels=("kind",)
    )
    expiries.add_metric(("idle",), totals.idle_expiries)
    expiries.add_metric(("absolute",), totals.absolute_expiries)
    yield expiries


def _lag_gauges(lags: dict[str, Lag]) -> Iterator[Metric]:
    events = GaugeMetricFamily(
        "session_ledger_projection_lag_events", "Events not yet applied.", labels=("projection",)
    )
    seconds = GaugeMetricFamily(
        "session_ledger_projection_lag_seconds",
        "Age of the oldest event not yet applied.",
        labels=("projection",),
    )
    for name, behind in sorted(lags.items()):
        events.add_metric((name,), behind.events)
        seconds.add_metric((name,), behind.seconds)
    yield events
    yield seconds


def _signal_gauges(lags: list[tuple[SignalStream, float]]) -> Iterator[Metric]:
    labels = ("stream_id", "client_id", "method")
    seconds = GaugeMetricFamily(
        "session_ledger_signal_stream_lag_seconds",
        "Age of the oldest Security Event Token a Shared Signals stream has yet to deliver"
        " (0: none waiting).",
        labels=labels,
    )
    failures = GaugeMetricFamily(
        "session_ledger_signal_stream_push_failures",
        "Push attempts that failed in a row (reset by the next delivery).",
        labels=labels,
    )
    for stream, lag_seconds in lags:
        names = (stream.stream_id, stream.client_id, stream.method)
        seconds.add_metric(names, lag_seconds)
        failures.add_metric(names, stream.failures)
    yield seconds
    yield failures


@router.get("/metrics", response_class=Response, responses=openapi.METRICS_RESPONSES)
async def metrics(request: Request) -> Response:
    expected: str | None = request.app.state.settings.metrics_token
    if expected is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise BearerRequired("/metrics needs the bearer token LEDGER_METRICS_TOKEN")
        if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
            raise InvalidToken("not the metrics token")
    registry: CollectorRegistry = request.app.state.metrics
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
