"""Append and read throughput of the event store, each beside a raw-PostgreSQL baseline.

    python -m bench.append [--url URL] [--appends N] [--bulk N]

Without --url (or LEDGER_DATABASE_URL) it starts an embedded PostgreSQL in a temporary directory.
Every figure comes from one run against one fresh database, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ledger.chain import GENESIS
from ledger.db import apply_schema, open_pool
from ledger.embedded import start_embedded, stop_embedded
from ledger.events import RefreshTokenRotated
from ledger.serialization import JsonValue
from ledger.store import START, EventStore, ImportRecord, Stream

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
META = {"ip": "192.0.2.7", "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"}
WHO = ',"ip":"192.0.2.7","user_agent":"Firefox/140.0"'  # RefreshTokenRotated's last fields
RAW_INSERT = (
    "INSERT INTO events (stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
RAW_SELECT = (
    "SELECT position, stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, recorded_at, tx_id::text, prev_hash, hash FROM events"
)


@dataclass(frozen=True)
class Figure:
    name: str
    count: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self, baseline: Figure | None = None) -> str:
        text = f"{self.name:<44} {self.rate:>11,.0f}/s"
        if self.latencies:
            p50, p99 = _percentile(self.latencies, 50), _percentile(self.latencies, 99)
            text += f"   p50 {p50 * 1000:6.2f} ms  p99 {p99 * 1000:6.2f} ms"
        if baseline is not None:
            text += f"   {self.rate / baseline.rate:6.1%} of baseline"
        return text


def _percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def p99(latencies: list[float]) -> float:
    """The 99th percentile as Figure.line prints it; infinite with fewer than two samples."""
    return _percentile(latencies, 99) if len(latencies) >= 2 else float("inf")


def target(is_met: bool, text: str) -> str:
    """A verdict line: `met` or `MISSED`, then what was measured against what."""
    return f"{'met   ' if is_met else 'MISSED'}  {text}"


def _event(n: int) -> RefreshTokenRotated:
    return RefreshTokenRotated(
        occurred_at=T0 + timedelta(seconds=n),
        generation=n + 1,
        refresh_token_hash=f"{n:064x}",
        ip="192.0.2.7",
        user_agent="Firefox/140.0",
    )


def _run_threads(concurrency: int, work: Callable[[int], list[float]]) -> tuple[float, list[float]]:
    barrier = threading.Barrier(concurrency + 1)
    results: list[list[float]] = [[] for _ in range(concurrency)]

    def run(worker: int) -> None:
        barrier.wait()
        results[worker] = work(worker)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, [lat for worker in results for lat in worker]


def bench_appends(store: EventStore, concurrency: int, total: int, tag: str) -> Figure:
    per_worker = total // concurrency

    def work(worker: int) -> list[float]:
        stream = Stream(f"{tag}-{worker}", "session")
        latencies = []
        for n in range(per_worker):
            began = time.perf_counter()
            store.append(stream, n, [_event(n)], META)
            latencies.append(time.perf_counter() - began)
        return latencies

    seconds, latencies = _run_threads(concurrency, work)
    name = f"append, 1 event/tx, concurrency {concurrency}"
    return Figure(name, per_worker * concurrency, seconds, latencies)


def bench_raw_inserts(url: str, concurrency: int, total: int, tag: str) -> Figure:
    per_worker = total // concurrency
    data = '{"generation":2,"refresh_token_hash":"' + "0" * 64 + '"' + WHO + "}"
    meta = '{"ip":"192.0.2.7","user_agent":"' + str(META["user_agent"]) + '"}'

    def work(worker: int) -> list[float]:
        latencies = []
        with psycopg.connect(url, autocommit=True) as conn:
            for n in range(per_worker):
                row = (f"{tag}-{worker}", "session", n + 1, "RefreshTokenRotated", 1, data, meta)
                began = time.perf_counter()
                conn.execute(RAW_INSERT, (*row, T0, GENESIS, GENESIS), prepare=True)
                latencies.append(time.perf_counter() - began)
        return latencies

    seconds, latencies = _run_threads(concurrency, work)
    name = f"raw INSERT, own tx, concurrency {concurrency}"
    return Figure(name, per_worker * concurrency, seconds, latencies)


def _import_records(count: int, tag: str) -> Iterator[ImportRecord]:
    for n in range(count):
        stream, version = divmod(n, 20)
        data: dict[str, JsonValue] = {
            "generation": version + 1,
            "refresh_token_hash": f"{n:064x}",
            "ip": "192.0.2.7",
            "user_agent": "Firefox/140.0",
        }
        yield ImportRecord(
            f"{tag}-{stream}", "session", version + 1, "RefreshTokenRotated", 1, T0, data, META
        )


def bench_bulk(store: EventStore, count: int) -> Figure:
    started = time.perf_counter()
    written = store.import_events(_import_records(count, "bulk"))
    return Figure("bulk import (COPY), with versions and chain", written, _elapsed(started), [])


def bench_raw_copy(url: str, count: int) -> Figure:
    copy = (
        "COPY events (stream_id, stream_type, version, type, schema_version, data, metadata,"
        " occurred_at, prev_hash, hash) FROM STDIN"
    )
    meta = '{"ip":"192.0.2.7","user_agent":"' + str(META["user_agent"]) + '"}'
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor().copy(copy) as writer:
        for n in range(count):
            stream, version = divmod(n, 20)
            data = (
                ('{"generation":' + str(version + 1) + ',"refresh_token_hash":"' + "0" * 64 + '"')
                + WHO
                + "}"
            )
            row = (f"rawbulk-{stream}", "session", version + 1, "RefreshTokenRotated", 1, data)
            writer.write_row((*row, meta, T0, GENESIS, GENESIS))
    return Figure("raw COPY of the same rows", count, _elapsed(started), [])


def bench_read_all(store: EventStore, page: int, *, decode: bool) -> Figure:
    started = time.perf_counter()
    count, checkpoint = 0, START
    while events := store.read_all(after=checkpoint, limit=page):
        if decode:
            for recorded in events:
                _ = recorded.event, recorded.metadata
        count += len(events)
        checkpoint = events[-1].checkpoint
    what = "every payload decoded" if decode else "payloads left encoded"
    return Figure(f"read_all, pages of {page:,}, {what}", count, _elapsed(started), [])


def bench_raw_select(url: str) -> Figure:
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        rows = conn.execute(RAW_SELECT).fetchall()
    return Figure("raw SELECT of the same rows", len(rows), _elapsed(started), [])


def _elapsed(started: float) -> float:
    return time.perf_counter() - started


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = make_conninfo(server_url, dbname=name)
        apply_schema(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            drop = sql.SQL("DROP DATABASE {} WITH (FORCE)")
            admin.execute(drop.format(sql.Identifier(name)))


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    """The given server, or an embedded one in a temporary directory, stopped before it goes."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        data_dir = Path(tmp) / "pgdata"
        try:
            yield start_embedded(data_dir)
        finally:
            # pgserver would stop it only at exit, once the directory is gone and pg_ctl cannot.
            stop_embedded(data_dir)


@contextmanager
def scratch_run(url: str | None) -> Iterator[tuple[str, Path]]:
    """A fresh database on `url`'s server (or an embedded one), and a directory for server logs."""
    with (
        postgres(url) as server_url,
        fresh_database(server_url) as database_url,
        tempfile.TemporaryDirectory(prefix="ledger-bench-logs-") as logs,
    ):
        yield database_url, Path(logs)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--appends", type=int, default=4000, help="appends per concurrency level")
    parser.add_argument("--bulk", type=int, default=200_000, help="events for the bulk import")
    args = parser.parse_args()

    with postgres(args.url) as server_url, fresh_database(server_url) as url:
        version = psycopg.connect(url).info.server_version
        print(f"PostgreSQL {version // 10000}.{version % 10000}, {os.cpu_count()} cores")
        with open_pool(url, min_size=8, max_size=8) as pool:
            store = EventStore(pool)
            shares = []
            for concurrency in (1, 8):
                raw = bench_raw_inserts(url, concurrency, args.appends, f"raw{concurrency}")
                ours = bench_appends(store, concurrency, args.appends, f"app{concurrency}")
                print(raw.line())
                print(ours.line(raw))
                shares.append((concurrency, ours.rate / raw.rate if raw.rate else 0.0))
            raw_copy = bench_raw_copy(url, args.bulk)
            print(raw_copy.line())
            bulk = bench_bulk(store, args.bulk)
            print(bulk.line(raw_copy))
            raw_select = bench_raw_select(url)
            print(raw_select.line())
            encoded = bench_read_all(store, 10_000, decode=False)
            print(encoded.line(raw_select))
            print(bench_read_all(store, 10_000, decode=True).line(raw_select))
    print()
    for line in verdict(shares, encoded.rate, bulk.rate):
        print(line)


def verdict(shares: list[tuple[int, float]], read_rate: float, bulk_rate: float) -> list[str]:
    """The targets of bench/README.md, each `met` or `MISSED` with what was measured."""
    lines = [
        target(share >= 0.7, f"append at least 70% of its baseline, {n} threads: {share:.0%}")
        for n, share in shares
    ]
    lines.append(target(read_rate >= 200_000, f"read_all at least 200,000/s: {read_rate:,.0f}/s"))
    lines.append(target(bulk_rate >= 50_000, f"bulk import at least 50,000/s: {bulk_rate:,.0f}/s"))
    return lines


if __name__ == "__main__":
    main()
