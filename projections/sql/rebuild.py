"""Rebuild a projection from events alone, into scratch tables, then swap or compare.

The scratch tables are temporary tables of the rebuilding connection: an interrupted rebuild
(Ctrl-C, a crash) loses them and leaves the live tables as they were. The swap replaces the live
rows in one transaction that readers never see half done. While a catch-up projection is rebuilt,
its runner is paused (the rebuild holds the runner's advisory lock); an inline projection's
writers are held back only during the final catch-up and swap.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from ledger.db import translated_errors
from ledger.records import START, Checkpoint, RecordedEvent
from ledger.serialization import format_timestamp
from ledger.store import EventStore
from projections.sql.catalog import Projection, Rebuilder
from projections.sql.runner import checkpoint, lock_key, set_checkpoint

Connection = psycopg.Connection[TupleRow]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Drift:
    """A row that differs between the live table and its rebuild (None: the row is missing)."""

    table: str
    key: tuple[Any, ...]
    live: dict[str, Any] | None
    rebuilt: dict[str, Any] | None

    def __str__(self) -> str:
        key = ", ".join(_readable(k) for k in self.key)
        if self.live is None:
            return (
                f"{self.table} [{key}]: missing from the live table; rebuilt {_row(self.rebuilt)}"
            )
        if self.rebuilt is None:
            return f"{self.table} [{key}]: not produced by the events; live {_row(self.live)}"
        changed = {c: (v, self.rebuilt[c]) for c, v in self.live.items() if self.rebuilt[c] != v}
        text = "; ".join(
            f"{c}: live {_readable(a)}, rebuilt {_readable(b)}" for c, (a, b) in changed.items()
        )
        return f"{self.table} [{key}]: {text}"


def _row(row: dict[str, Any] | None) -> str:
    return "(none)" if row is None else ", ".join(f"{c}={_readable(v)}" for c, v in row.items())


def _readable(value: Any) -> str:
    """A column value as a person reads it: times in RFC 3339 UTC, JSON as JSON."""
    if value is None:
        return "null"
    if isinstance(value, datetime) and value.tzinfo is not None:
        return format_timestamp(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_readable(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def rebuild(
    url: str,
    store: EventStore,
    projection: Projection,
    *,
    check: bool = False,
    batch_size: int = 10_000,
    progress: Progress | None = None,
) -> list[Drift]:
    """Replay every event into scratch tables; swap them in, or with `check` list the drift."""
    with translated_errors(), psycopg.connect(url, autocommit=True) as conn:
        if not projection.inline:
            conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", lock_key(projection))
        scratch = _scratch_tables(conn, projection)
        stop = checkpoint(conn, projection.name) if check and not projection.inline else None
        replay = _Replay(conn, store, _sink(store, conn, projection, scratch), batch_size)
        with _no_cycle_collection():
            replay.run(stop, store.count(stop, conn=conn), progress)
        with conn.transaction():
            if projection.inline:
                _lock_writers_out(conn, projection)
                replay.run(None, 0, None, visible=True)
            elif stop is None:
                replay.run(None, 0, None)
            replay.sink.flush()
            if check:
                return _drift(conn, projection, scratch)
            for table, copy in scratch.items():
                conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
                conn.execute(
                    sql.SQL("INSERT INTO {} SELECT * FROM {}").format(
                        sql.Identifier(table), sql.Identifier(copy)
                    )
                )
            if not projection.inline:
                set_checkpoint(conn, projection.name, replay.after)
        return []


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    # A rebuild allocates millions of short-lived objects while holding every folded row: the
    # cycle collector would rescan those rows again and again for nothing (the fold makes no
    # cycles). Reference counting still frees everything; collection resumes afterwards.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _scratch_tables(conn: Connection, projection: Projection) -> dict[str, str]:
    scratch = {table: f"{table}_rebuild" for table in projection.tables}
    for table, copy in scratch.items():
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING ALL)").format(
                sql.Identifier(copy), sql.Identifier(table)
            )
        )
    return scratch


class _Batches:
    """A rebuild sink that applies each batch with the projection's own apply."""

    def __init__(
        self,
        store: EventStore,
        conn: Connection,
        projection: Projection,
        scratch: dict[str, str],
    ):
        self._store, self._conn, self._projection, self._scratch = store, conn, projection, scratch

    def apply(self, events: Sequence[RecordedEvent]) -> None:
        if self._conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            self._projection.apply(self._store, self._conn, events, self._scratch)
            return
        with self._conn.transaction():
            self._projection.apply(self._store, self._conn, events, self._scratch)

    def flush(self) -> None:
        pass  # every batch is written as it is applied


def _sink(
    store: EventStore, conn: Connection, projection: Projection, scratch: dict[str, str]
) -> Rebuilder:
    if projection.rebuilder is not None:
        return projection.rebuilder(conn, scratch)
    return _Batches(store, conn, projection, scratch)


class _Replay:
    """Reads events in the gap-safe order from a checkpoint on and feeds them to a sink."""

    def __init__(self, conn: Connection, store: EventStore, sink: Rebuilder, batch_size: int):
        self._conn, self._store, self.sink, self._batch_size = conn, store, sink, batch_size
        self.after = START

    def run(
        self,
        stop: Checkpoint | None,
        total: int,
        progress: Progress | None,
        *,
        visible: bool = False,
    ) -> None:
        done = 0
        read = self._store.read_visible if visible else self._store.read_all
        while events := read(self.after, self._batch_size, conn=self._conn):
            if stop is not None:
                events = [e for e in events if e.checkpoint <= stop]
                if not events:
                    return
            self.sink.apply(events)
            self.after = events[-1].checkpoint
            done += len(events)
            if progress is not None:
                progress(done, total)


def _lock_writers_out(conn: Connection, projection: Projection) -> None:
    # EXCLUSIVE lets readers on but waits for, and then holds back, every writer of these rows.
    for table in projection.tables:
        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(table)))


def _drift(conn: Connection, projection: Projection, scratch: dict[str, str]) -> list[Drift]:
    drift: list[Drift] = []
    for table, keys in projection.tables.items():
        live = _rows_only_in(conn, table, scratch[table], keys)
        rebuilt = _rows_only_in(conn, scratch[table], table, keys)
        for key in sorted(live.keys() | rebuilt.keys(), key=str):
            drift.append(Drift(table, key, live.get(key), rebuilt.get(key)))
    return drift


def _rows_only_in(
    conn: Connection, table: str, other: str, keys: tuple[str, ...]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    query = sql.SQL("SELECT * FROM {} EXCEPT SELECT * FROM {}").format(
        sql.Identifier(table), sql.Identifier(other)
    )
    cursor = conn.execute(query)
    columns = [c.name for c in cursor.description or ()]
    rows = [dict(zip(columns, row, strict=True)) for row in cursor]
    return {tuple(row[k] for k in keys): row for row in rows}
