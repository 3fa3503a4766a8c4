"""The catch-up runner: applies new events to each catch-up projection exactly once.

Each batch is one transaction that locks the projection's checkpoint row, reads the next events in
the gap-safe order (DESIGN.md), folds them and moves the checkpoint: rows and checkpoint commit
together or not at all, so a runner killed mid-batch redoes the batch and nothing twice. A
session-level advisory lock makes one runner per projection active across processes; the others
stand by. Runners wake on NOTIFY ledger_events and poll as a fallback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from ledger.db import connect, translated_errors
from ledger.errors import LedgerError
from ledger.records import START, Checkpoint
from ledger.store import EventStore
from projections.sql.catalog import CATCH_UP, Projection, live_tables

Connection = psycopg.Connection[TupleRow]

CHANNEL = "ledger_events"
_log = logging.getLogger("session_ledger.projections")
_LOCK_KEY = 7261003
_ENSURE = (
    "INSERT INTO projection_checkpoints (name, tx_id, position) VALUES (%s, 0, 0)"
    " ON CONFLICT DO NOTHING"
)
_CHECKPOINT = "SELECT tx_id, position FROM projection_checkpoints WHERE name = %s FOR UPDATE"
_ADVANCE = (
    "UPDATE projection_checkpoints SET tx_id = %s, position = %s, updated_at = now()"
    " WHERE name = %s"
)


@dataclass(frozen=True)
class Lag:
    """How far a projection is behind the head of the log."""

    events: int
    seconds: float


def lock_key(projection: Projection) -> tuple[int, str]:
    """The advisory lock (two-key form) that one active runner of the projection holds."""
    return _LOCK_KEY, projection.name


def checkpoint(conn: Connection, name: str, *, for_update: bool = False) -> Checkpoint:
    """The projection's stored checkpoint (START before its first batch).

    `for_update` creates the row if needed, so that there is a row to lock; a plain read (lag,
    metrics) writes nothing.
    """
    if for_update:
        conn.execute(_ENSURE, (name,))
    query = _CHECKPOINT if for_update else _CHECKPOINT.removesuffix(" FOR UPDATE")
    row = conn.execute(query, (name,)).fetchone()
    return START if row is None else Checkpoint(int(row[0]), int(row[1]))


def set_checkpoint(conn: Connection, name: str, to: Checkpoint) -> None:
    """Move the projection's checkpoint, in the caller's transaction."""
    conn.execute(_ENSURE, (name,))
    _advance(conn, name, to)


def _advance(conn: Connection, name: str, to: Checkpoint) -> None:
    conn.execute(_ADVANCE, (to.tx_id, to.position, name))


def apply_batch(conn: Connection, store: EventStore, projection: Projection, limit: int) -> int:
    """Apply the next batch after the checkpoint in one transaction; the number of events."""
    with conn.transaction():
        after = checkpoint(conn, projection.name, for_update=True)
        events = store.read_all(after, limit, conn=conn)
        if not events:
            return 0
        projection.apply(store, conn, events, live_tables(projection))
        _advance(conn, projection.name, events[-1].checkpoint)  # its row exists: locked above
    return len(events)


def lag(store: EventStore, conn: Connection, projection: Projection, now: datetime) -> Lag:
    """Events after the checkpoint, and the age of the oldest of them."""
    backlog = store.backlog(checkpoint(conn, projection.name), conn=conn)
    oldest = backlog.oldest_recorded_at
    seconds = 0.0 if oldest is None else max((now - oldest) / timedelta(seconds=1), 0.0)
    return Lag(backlog.events, seconds)


class Runner:
    """Keeps catch-up projections current; `run_once` for one pass, `run` until stopped."""

    def __init__(
        self,
        url: str,
        pool: ConnectionPool,
        projections: Sequence[Projection] = CATCH_UP,
        *,
        batch_size: int = 1000,
        poll_seconds: float = 1.0,
        pause_seconds: float = 0.25,
        role: str | None = None,
    ) -> None:
        self._url = url
        self._role = role
        self._store = EventStore(pool)
        self._projections = tuple(projections)
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._pause_seconds = pause_seconds
        self.stopping = threading.Event()

    def run_once(self, on_batch: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """Catch every projection this runner can lock up with the head; events applied each."""
        with translated_errors(), connect(self._url, role=self._role) as conn:
            return self._catch_up(conn, on_batch)

    def run(self) -> None:
        """Apply new events as they come until `stopping` is set (LISTEN with polling).

        A database outage does not end it: it reconnects after a pause, and resumes from the
        checkpoints.
        """
        while not self.stopping.is_set():
            try:
                self._listen()
            except LedgerError as e:
                _log.warning("projection runner: %s; retrying in %.0f s", e, self._poll_seconds)
                self.stopping.wait(self._poll_seconds)

    def _listen(self) -> None:
        with translated_errors(), connect(self._url, role=self._role) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            while not self.stopping.is_set():
                self._catch_up(conn, None)
                # Under load every commit notifies: pausing between passes lets events gather
                # into larger batches instead of costing a pass each.
                self.stopping.wait(self._pause_seconds)
                for _ in conn.notifies(timeout=self._poll_seconds, stop_after=1):
                    pass

    def stop(self) -> None:
        """Ask `run` to return; it is woken at once rather than at its next poll."""
        self.stopping.set()
        with suppress(psycopg.Error), connect(self._url, role=self._role) as conn:
            conn.execute(f"NOTIFY {CHANNEL}")

    def _catch_up(
        self, conn: Connection, on_batch: Callable[[str, int], None] | None
    ) -> dict[str, int]:
        applied: dict[str, int] = {}
        for projection in self._projections:
            if not _try_lock(conn, projection):
                continue  # another runner is active for it
            try:
                applied[projection.name] = 0
                while not self.stopping.is_set():
                    count = apply_batch(conn, self._store, projection, self._batch_size)
                    if count == 0:
                        break
                    applied[projection.name] += count
                    if on_batch is not None:
                        on_batch(projection.name, count)
            finally:
                _unlock(conn, projection)
        return applied


def _try_lock(conn: Connection, projection: Projection) -> bool:
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", lock_key(projection)
    ).fetchone()
    return bool(row and row[0])


def _unlock(conn: Connection, projection: Projection) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", lock_key(projection))
