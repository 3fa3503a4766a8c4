"""The event store: append at an expected version, ordered reads, chain checks, bulk import."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from ledger.chain import GENESIS, BrokenLink, ChainChecker, Envelope
from ledger.db import translated_errors
from ledger.errors import ConcurrencyConflict, InvalidImport, LedgerError
from ledger.events import Event, decode_event, event_class, event_data
from ledger.serialization import JsonValue, canonical_bytes, to_json_value

Connection = psycopg.Connection[TupleRow]

_COLUMNS = (
    "position, stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, recorded_at, tx_id::text, prev_hash, hash"
)
_HEAD = "SELECT version, hash FROM events WHERE stream_id = %s ORDER BY version DESC LIMIT 1"
_HEADS = (
    "SELECT DISTINCT ON (stream_id) stream_id, version, hash FROM events"
    " WHERE stream_id = ANY(%s) ORDER BY stream_id, version DESC"
)
_INSERT = (
    "INSERT INTO events (stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " RETURNING position"
)
_COPY = (
    "COPY events (stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, prev_hash, hash) FROM STDIN"
)
# _COLUMNS is a constant; every value travels as a parameter.
_READ_STREAM = (
    f"SELECT {_COLUMNS} FROM events WHERE stream_id = %s AND version >= %s ORDER BY version"  # noqa: S608
)
# Only rows below the oldest running transaction: nothing can commit behind them later (DESIGN.md).
_READ_ALL = (
    f"SELECT {_COLUMNS} FROM events"  # noqa: S608
    " WHERE (tx_id, position) > (%s::text::xid8, %s)"
    " AND tx_id < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY tx_id, position LIMIT %s"
)
_CHAIN = (  # Envelope's field order, then the stored links
    "SELECT stream_id, stream_type, version, type, schema_version, occurred_at, data, metadata,"
    " prev_hash, hash FROM events ORDER BY stream_id, version"
)
_CONFLICT_CONSTRAINT = "events_stream_version_key"
_IMPORT_CHUNK = 5000


@dataclass(frozen=True)
class Stream:
    """A stream's identity: its id and the kind of aggregate it belongs to."""

    id: str
    type: str


class Checkpoint(NamedTuple):
    """A catch-up reader's position in the gap-safe `(tx_id, position)` order."""

    tx_id: int
    position: int


START = Checkpoint(0, 0)


@dataclass(frozen=True)
class AppendResult:
    """What an append wrote: the stream's new version and the events' global positions."""

    version: int
    positions: tuple[int, ...]


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored: the decoded event with its envelope."""

    position: int
    stream_id: str
    stream_type: str
    version: int
    event: Event
    metadata: dict[str, JsonValue]
    recorded_at: datetime
    tx_id: int
    hash: bytes

    @property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint a reader stores after applying this event."""
        return Checkpoint(self.tx_id, self.position)


@dataclass(frozen=True)
class ImportRecord:
    """One event of a bulk import, already in stored form (as an export writes it)."""

    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    occurred_at: datetime
    data: Mapping[str, JsonValue]
    metadata: Mapping[str, JsonValue]


class _LostRace(LedgerError):
    """A concurrent writer took the version this append wanted (internal to EventStore.append)."""


class EventStore:
    """Appends events to streams in PostgreSQL and reads them back."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def append(
        self,
        stream: Stream,
        expected_version: int,
        events: Sequence[Event],
        metadata: Mapping[str, object] | None = None,
        *,
        conn: Connection | None = None,
    ) -> AppendResult:
        """Append events after `expected_version` in one transaction, or raise ConcurrencyConflict.

        With `conn`, the append joins that connection's transaction, which the caller then commits
        (with its projection rows) or rolls back; after a conflict it must roll back.
        """
        if expected_version < 0 or not events:
            raise ValueError("append needs expected_version >= 0 and at least one event")
        envelopes = _envelopes(stream, expected_version, events, metadata or {})
        try:
            with self._transaction(conn) as tx:
                return _insert(tx, stream.id, expected_version, envelopes)
        except _LostRace as lost:
            # The winner committed; its version is only visible outside our failed transaction.
            actual = self.version(stream.id)
            raise ConcurrencyConflict(stream.id, expected_version, actual) from lost.__cause__

    def version(self, stream_id: str) -> int:
        """The stream's current version; 0 when it has no events."""
        with translated_errors(), self._pool.connection() as conn:
            row = conn.execute(_HEAD, (stream_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def read_stream(self, stream_id: str, from_version: int = 1) -> list[RecordedEvent]:
        """The stream's events from `from_version` on, in version order."""
        with translated_errors(), self._pool.connection() as conn:
            rows = conn.execute(_READ_STREAM, (stream_id, from_version)).fetchall()
        return [_recorded(row) for row in rows]

    def read_all(self, after: Checkpoint = START, limit: int = 1000) -> list[RecordedEvent]:
        """Up to `limit` events after `after` in gap-safe order; a late commit is never skipped."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with translated_errors(), self._pool.connection() as conn:
            rows = conn.execute(_READ_ALL, (str(after.tx_id), after.position, limit)).fetchall()
        return [_recorded(row) for row in rows]

    def verify(self) -> list[BrokenLink]:
        """Recompute every stream's hash chain; return each broken stream's first broken link."""
        checker = ChainChecker()
        with (
            translated_errors(),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="ledger_verify") as cursor,
        ):
            cursor.itersize = 10_000
            for row in cursor.execute(_CHAIN):
                *fields, prev_hash, stored = row
                checker.check(Envelope(*fields), bytes(prev_hash), bytes(stored))
        return checker.broken

    def import_events(self, records: Iterable[ImportRecord]) -> int:
        """Bulk-append stored-form events with COPY, continuing each stream's versions and chain.

        Everything is written in one transaction: a record out of version sequence, an unknown
        type or a concurrent writer on an imported stream rolls the whole import back.
        """
        heads: dict[str, tuple[int, bytes]] = {}
        count = 0
        with self._transaction(None) as tx:
            for chunk in _chunks(records, _IMPORT_CHUNK):
                _load_heads(tx, heads, {r.stream_id for r in chunk} - heads.keys())
                rows = [_import_row(record, heads) for record in chunk]
                try:
                    with tx.cursor().copy(_COPY) as copy:
                        for row in rows:
                            copy.write_row(row)
                except pg_errors.UniqueViolation as e:
                    raise InvalidImport("another writer appended to a stream being imported") from e
                count += len(rows)
        return count

    @contextmanager
    def _transaction(self, conn: Connection | None) -> Iterator[Connection]:
        with translated_errors():
            if conn is None:
                with self._pool.connection() as own, own.transaction():
                    yield own
            elif conn.autocommit:
                raise ValueError("append(conn=...) needs a connection that is not in autocommit")
            else:
                yield conn  # the caller commits or rolls back


def _envelopes(
    stream: Stream, expected_version: int, events: Sequence[Event], metadata: Mapping[str, object]
) -> list[Envelope]:
    meta = to_json_value(metadata, "$metadata")
    assert isinstance(meta, dict)
    envelopes = []
    for version, event in enumerate(events, start=expected_version + 1):
        data = event_data(event)  # first: it refuses unregistered classes
        cls = type(event)
        envelopes.append(
            Envelope(
                stream.id,
                stream.type,
                version,
                cls.type_name,
                cls.schema_version,
                event.occurred_at,
                data,
                meta,
            )
        )
    return envelopes


def _insert(
    conn: Connection, stream_id: str, expected_version: int, envelopes: list[Envelope]
) -> AppendResult:
    head = conn.execute(_HEAD, (stream_id,)).fetchone()
    actual, prev_hash = (0, GENESIS) if head is None else (int(head[0]), bytes(head[1]))
    if actual != expected_version:
        raise ConcurrencyConflict(stream_id, expected_version, actual)
    positions: list[int] = []
    with conn.cursor() as cursor:
        for envelope in envelopes:
            prev_hash, row = _row(envelope, prev_hash)
            try:
                positions.append(_one(cursor.execute(_INSERT, row, prepare=True).fetchone()))
            except pg_errors.UniqueViolation as e:
                if e.diag.constraint_name != _CONFLICT_CONSTRAINT:
                    raise
                raise _LostRace from e
    return AppendResult(envelopes[-1].version, tuple(positions))


def _row(envelope: Envelope, prev_hash: bytes) -> tuple[bytes, tuple[Any, ...]]:
    """The event's hash and its column values, in _INSERT and _COPY order."""
    link = envelope.link_hash(prev_hash)
    return link, (
        envelope.stream_id,
        envelope.stream_type,
        envelope.version,
        envelope.type,
        envelope.schema_version,
        canonical_bytes(envelope.data).decode("utf-8"),
        canonical_bytes(envelope.metadata).decode("utf-8"),
        envelope.occurred_at,
        prev_hash,
        link,
    )


def _one(row: tuple[Any, ...] | None) -> int:
    assert row is not None
    return int(row[0])


def _recorded(row: tuple[Any, ...]) -> RecordedEvent:
    position, stream_id, stream_type, version, type_name, schema_version, data, metadata = row[:8]
    occurred_at, recorded_at, tx_id, _prev_hash, hash_ = row[8:]
    return RecordedEvent(
        position=position,
        stream_id=stream_id,
        stream_type=stream_type,
        version=version,
        event=decode_event(type_name, schema_version, data, occurred_at),
        metadata=metadata,
        recorded_at=recorded_at,
        tx_id=int(tx_id),
        hash=bytes(hash_),
    )


def _chunks(records: Iterable[ImportRecord], size: int) -> Iterator[list[ImportRecord]]:
    chunk: list[ImportRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load_heads(conn: Connection, heads: dict[str, tuple[int, bytes]], streams: set[str]) -> None:
    heads.update({stream: (0, GENESIS) for stream in streams})
    for stream_id, version, hash_ in conn.execute(_HEADS, (list(streams),)):
        heads[stream_id] = (int(version), bytes(hash_))


def _import_row(record: ImportRecord, heads: dict[str, tuple[int, bytes]]) -> tuple[Any, ...]:
    version, prev_hash = heads[record.stream_id]
    if record.version != version + 1:
        raise InvalidImport(
            f"stream {record.stream_id!r}: version {record.version} cannot follow version {version}"
        )
    event_class(record.type)
    data, metadata = to_json_value(record.data, "$data"), to_json_value(record.metadata, "$meta")
    assert isinstance(data, dict)
    assert isinstance(metadata, dict)
    envelope = Envelope(
        record.stream_id,
        record.stream_type,
        record.version,
        record.type,
        record.schema_version,
        record.occurred_at,
        data,
        metadata,
    )
    link, row = _row(envelope, prev_hash)
    heads[record.stream_id] = (record.version, link)
    return row
