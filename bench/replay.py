"""Rebuild, point-in-time replay and export of a generated ledger, beside a plain COPY as the floor.

    python -m bench.replay [--url URL] [--events N] [--seed S] [--samples N] [--batch-size N]
                           [--catch-up]

Without --url (or LEDGER_DATABASE_URL) it starts an embedded PostgreSQL in a temporary directory.
The seeded generator in bench/generate.py writes at least --events events of realistic sessions
into a fresh database with the bulk import, and the live projection rows those events add up to,
so that a rebuild has rows to replace. Every figure then comes from that one database in one run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from bench.append import Figure, fresh_database, p99, postgres, target
from bench.generate import History, generate
from ledger.db import open_pool
from ledger.export import ExportFormat, export_events
from ledger.store import EventStore
from projections.replay import as_of
from projections.session import Policy
from projections.sql.catalog import CATCH_UP, PROJECTIONS
from projections.sql.inline import load_session, save_principal, save_session
from projections.sql.rebuild import rebuild
from projections.streams import session_stream_id

REBUILD_TARGET = 100_000  # events/s
POINT_IN_TIME_TARGET = 0.005  # seconds, p99
TARGET_EVENTS = 1_000_000  # the ledger size the latency target is stated at
FLOOR = "COPY (SELECT * FROM events) TO STDOUT"
CHECKED_SESSIONS = 200


@dataclass(frozen=True)
class Results:
    """The figures the verdict is drawn from."""

    events: int
    rebuild: Figure
    point_in_time: Figure


def load_history(store: EventStore, seed: int, events: int) -> tuple[History, Figure]:
    """Generate the history and bulk-import it: the figure is the two together."""
    history = History()
    started = time.perf_counter()
    written = store.import_events(generate(seed, events, history))
    return history, Figure("generate + import_events (COPY)", written, _elapsed(started), [])


def save_live_rows(url: str, history: History) -> None:
    """Write the rows the inline projections would hold after this history, in one transaction."""
    with psycopg.connect(url) as conn, conn.pipeline():
        for state in history.sessions.values():
            save_session(conn, state)
        for principal_state in history.principals.values():
            save_principal(conn, principal_state)


def bench_rebuild(url: str, store: EventStore, name: str, events: int, batch_size: int) -> Figure:
    """Rebuild one projection from every event and swap it in."""
    started = time.perf_counter()
    rebuild(url, store, PROJECTIONS[name], batch_size=batch_size)
    return Figure(f"rebuild {name}", events, _elapsed(started), [])


def check_sessions(pool: ConnectionPool, history: History, rng: random.Random) -> int:
    """How many of a sample of rebuilt session rows differ from the generator's own fold."""
    ids = rng.sample(sorted(history.sessions), min(CHECKED_SESSIONS, len(history.sessions)))
    with pool.connection() as conn:
        rows = {i: load_session(conn, i, for_update=False) for i in ids}
    return sum(rows[i] != history.sessions[i] for i in ids)


def bench_point_in_time(
    store: EventStore, history: History, rng: random.Random, samples: int
) -> tuple[Figure, Figure, Counter[str]]:
    """One session's state at a random moment: read its stream, decode, fold up to the moment.

    The moment falls between the session's start and an idle timeout after its last event, so
    some answers are "valid" and others ended or expired. Returns the whole answer's figure, the
    read's alone, and the statuses seen.
    """
    policy = Policy()
    ids = sorted(history.sessions)
    picks = [rng.choice(ids) for _ in range(samples)]
    totals, reads, statuses = [], [], Counter[str]()
    for session_id in picks:
        state = history.sessions[session_id]
        span = history.last_event[session_id] + policy.idle_timeout - state.started_at
        moment = state.started_at + span * rng.random()
        began = time.perf_counter()
        recorded = store.read_stream(session_stream_id(session_id))
        read = time.perf_counter()
        # Every event decoded, then folded up to the moment: as api/audit.py and the CLI do.
        answer = as_of(session_id, [r.event for r in recorded], moment, policy)
        totals.append(time.perf_counter() - began)
        reads.append(read - began)
        statuses[answer.status] += 1
    return (
        Figure("point-in-time: read_stream + decode + as_of", samples, sum(totals), totals),
        Figure("  of which read_stream (payloads undecoded)", samples, sum(reads), reads),
        statuses,
    )


def bench_copy_floor(url: str, events: int) -> tuple[Figure, int]:
    """A plain COPY of every row to the client, the data thrown away: what any export costs."""
    size = 0
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor().copy(FLOOR) as copy:
        for block in copy:
            size += len(block)
    return Figure("plain COPY events TO STDOUT (the floor)", events, _elapsed(started), []), size


def bench_export(pool: ConnectionPool, fmt: ExportFormat, directory: Path) -> tuple[Figure, int]:
    """ledger.export to a file in `directory`; the figure and the file's size."""
    path = directory / f"events.{fmt.value}"
    started = time.perf_counter()
    count = export_events(pool, path, fmt, overwrite=True)
    figure = Figure(f"export {fmt.value}", count, _elapsed(started), [])
    size = path.stat().st_size
    path.unlink()
    return figure, size


def verdict(results: Results) -> list[str]:
    rate = results.rebuild.rate
    lines = [target(rate >= REBUILD_TARGET, f"rebuild sessions ≥ 100,000 events/s: {rate:,.0f}/s")]
    slowest = p99(results.point_in_time.latencies)
    text = f"point-in-time p99 < 5 ms at 1,000,000 events: {slowest * 1000:.2f} ms"
    if results.events < TARGET_EVENTS:
        text += f" (at {results.events:,} events only: indicative)"
    lines.append(target(slowest < POINT_IN_TIME_TARGET, text))
    return lines


def _size(size: int) -> str:
    return f"   {size / 1e6:8,.1f} MB"


def _elapsed(started: float) -> float:
    return time.perf_counter() - started


def _progress(text: str) -> None:
    print(f"… {text}", file=sys.stderr, flush=True)


def _describe(history: History) -> str:
    counts = history.counts
    ended = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("SessionEnded:")}
    endings = ", ".join(f"{reason} {n:,}" for reason, n in sorted(ended.items()))
    first = min(s.started_at for s in history.sessions.values())
    days = (max(history.last_event.values()) - first).total_seconds() / 86400
    return (
        f"{history.events:,} events over {days:.1f} days: {history.users:,} users,"
        f" {len(history.sessions):,} sessions ({endings}), {len(history.principals):,} principals"
        f" ({counts['LoginFailed']:,} failed logins, {counts['PrincipalLocked']:,} locks)"
    )


def run(url: str, args: argparse.Namespace) -> Results:
    rng = random.Random(args.seed + 1)
    with open_pool(url, min_size=2, max_size=4) as pool:
        store = EventStore(pool)
        _progress(f"generating and importing {args.events:,} events")
        history, loaded = load_history(store, args.seed, args.events)
        print(_describe(history))
        print(loaded.line())
        save_live_rows(url, history)
        _progress("rebuilding sessions")
        rebuilt = bench_rebuild(url, store, "sessions", history.events, args.batch_size)
        print(rebuilt.line())
        differing = check_sessions(pool, history, rng)
        print(f"  sampled rebuilt session rows that differ from the generator's fold: {differing}")
        names = ["principals", *(p.name for p in CATCH_UP)] if args.catch_up else []
        for name in names:
            _progress(f"rebuilding {name}")
            print(bench_rebuild(url, store, name, history.events, args.batch_size).line())
        _progress(f"point-in-time replay of {args.samples:,} sessions")
        whole, read, statuses = bench_point_in_time(store, history, rng, args.samples)
        print(whole.line())
        print(read.line())
        print("  answers: " + ", ".join(f"{s} {n:,}" for s, n in statuses.most_common()))
        _progress("COPY floor and exports")
        floor, size = bench_copy_floor(url, history.events)
        print(floor.line() + _size(size))
        with tempfile.TemporaryDirectory(prefix="ledger-bench-export-") as tmp:
            for fmt in (ExportFormat.JSONL, ExportFormat.PARQUET):
                figure, size = bench_export(pool, fmt, Path(tmp))
                print(figure.line(floor) + _size(size))
    return Results(history.events, rebuilt, whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--events", type=int, default=TARGET_EVENTS, help="at least this many")
    parser.add_argument("--seed", type=int, default=1, help="seeds the history and the samples")
    parser.add_argument("--samples", type=int, default=2000, help="point-in-time answers")
    parser.add_argument("--batch-size", type=int, default=10_000, help="events per rebuild batch")
    parser.add_argument(
        "--catch-up", action="store_true", help="also rebuild principals and catch-up projections"
    )
    args = parser.parse_args()

    began = time.perf_counter()
    with postgres(args.url) as server_url, fresh_database(server_url) as url:
        with psycopg.connect(url) as conn:
            version = conn.info.server_version
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"PostgreSQL {version // 10000}.{version % 10000}, {os.cpu_count()} cores,", end="")
        print(f" load average {load}, seed {args.seed}")
        sys.stdout.flush()  # before the progress lines on stderr
        results = run(url, args)
    print()
    for line in verdict(results):
        print(line)
    print(f"(whole run {_elapsed(began):,.0f} s)")


if __name__ == "__main__":
    main()
