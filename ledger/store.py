"""The event store: append at an expected version, ordered reads, chain checks, bulk import."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ledger.chain import GENESIS, BrokenLink, ChainChecker, Envelope
from ledger.db import translated_errors
from ledger.errors import ConcurrencyConflict, InvalidImport, LedgerError
from ledger.events import Event, event_class, event_data
from ledger.records import (
    MAX_POSITION,
    START,
    AppendResult,
    Checkpoint,
    ImportRecord,
    RecordedEvent,
    Stream,
)
from ledger.serialization import canonical_json, to_json_value

__all__ = [
    "START",
    "AppendResult",
    "Backlog",
    "Checkpoint",
    "EventStore",
    "ImportRecord",
    "PipelinedTransaction",
    "RecordedEvent",
    "Stream",
]

Connection = psycopg.Connection[TupleRow]
AsyncConnection = psycopg.AsyncConnection[TupleRow]

# One event: chained to the hash of version `prev`, which must exist (or prev = 0). A stale `prev`
# fails on the unique (stream_id, version) key; one ahead of the stream inserts no row. Neither
# does a transaction older than the one that wrote `prev`: catch-up readers go in transaction
# order, so a stream's versions must never run against it (DESIGN.md's ordering rule).
_APPEND = """
INSERT INTO events (stream_id, stream_type, version, type, schema_version, data, metadata,
                    occurred_at, prev_hash, hash)
SELECT %(stream_id)s, %(stream_type)s, %(prev)s::integer + 1, %(type)s, %(schema_version)s,
       %(data)s::jsonb, %(metadata)s::jsonb, %(occurred_at)s, head.hash,
       sha256(head.hash || %(body)s::bytea)
  FROM (SELECT hash, tx_id FROM events
         WHERE stream_id = %(stream_id)s AND version = %(prev)s::integer
        UNION ALL
        SELECT %(genesis)s::bytea, NULL::xid8 WHERE %(prev)s::integer = 0) AS head
 WHERE head.tx_id IS NULL OR head.tx_id <= pg_current_xact_id()
RETURNING position
"""
# _APPEND for a pipelined transaction, whose later statements are sent before its result is read:
# an append that would insert nothing raises instead (schema.sql), aborting the transaction.
_APPEND_OR_REFUSE = f"""
WITH appended AS ({_APPEND.strip()})
SELECT position FROM appended
UNION ALL
SELECT events_append_refused(%(stream_id)s, %(prev)s::integer)
 WHERE NOT EXISTS (SELECT FROM appended)
"""  # noqa: S608  (_APPEND is a constant; values are parameters)
_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = %s"
_HEADS = (
    "SELECT DISTINCT ON (stream_id) stream_id, version, hash, tx_id > pg_current_xact_id()"
    " FROM events WHERE stream_id = ANY(%s) ORDER BY stream_id, version DESC"
)
_COPY = (
    "COPY events (stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, prev_hash, hash) FROM STDIN"
)
# RecordedEvent's field order. The cast tx_id is renamed: under its own name it would shadow the
# column in ORDER BY, which would then sort every row instead of walking events_catch_up_idx.
_COLUMNS = (
    "position, stream_id, stream_type, version, type, schema_version, occurred_at, recorded_at,"
    " tx_id::text::bigint AS tx_number, data::text, metadata::text"
)
# _COLUMNS is a constant; every value travels as a parameter.
_READ_STREAM = (
    f"SELECT {_COLUMNS} FROM events WHERE stream_id = %s AND version >= %s"  # noqa: S608
    " ORDER BY version LIMIT %s"
)
# Only rows below the oldest running transaction: nothing can commit behind them later (DESIGN.md).
_READ_ALL = (
    f"SELECT {_COLUMNS} FROM events"  # noqa: S608
    " WHERE (tx_id, position) > (%s::text::xid8, %s::bigint)"
    " AND tx_id < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY tx_id, position LIMIT %s"
)
# read_all with filters; a NULL parameter disables its filter.
_READ_FILTERED = (
    f"SELECT {_COLUMNS} FROM events"  # noqa: S608
    " WHERE (tx_id, position) > (%s::text::xid8, %s::bigint)"
    " AND tx_id < pg_snapshot_xmin(pg_current_snapshot())"
    " AND (%s::text[] IS NULL OR type = ANY(%s::text[]))"
    " AND (%s::text[] IS NULL OR stream_id = ANY(%s::text[]))"
    " AND (%s::timestamptz IS NULL OR occurred_at >= %s::timestamptz)"
    " AND (%s::timestamptz IS NULL OR occurred_at < %s::timestamptz)"
    " ORDER BY tx_id, position LIMIT %s"
)
# Everything committed, horizon or not: only for readers that lock writers out (see read_visible).
_READ_VISIBLE = (
    f"SELECT {_COLUMNS} FROM events"  # noqa: S608
    " WHERE (tx_id, position) > (%s::text::xid8, %s::bigint)"
    " ORDER BY tx_id, position LIMIT %s"
)
# read_all of one type. The type is written into the statement (a registered type name, never
# input), so that a partial index on it (schema.sql has one for SessionEnded) serves even the
# generic plan of a prepared statement.
_READ_TYPE = _READ_ALL.replace(" WHERE ", " WHERE type = '{type}' AND ", 1)
_FIRST_RECORDED = (
    "SELECT tx_id::text::bigint, position FROM events"
    " WHERE type = '{type}' AND recorded_at >= now() - %s::interval"
    " ORDER BY tx_id, position LIMIT 1"
)
_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
# Version 1 of a stream is its first event, which never changes.
_READ_FIRST = f"SELECT {_COLUMNS} FROM events WHERE stream_id = ANY(%s) AND version = 1"  # noqa: S608
# Every committed event after the checkpoint, horizon or not: a backlog counts what is waiting.
_BACKLOG = (
    "SELECT count(*), min(recorded_at) FROM events"
    " WHERE (tx_id, position) > (%s::text::xid8, %s::bigint)"
)
_COUNT_ALL = "SELECT count(*) FROM events"
_COUNT_UP_TO = "SELECT count(*) FROM events WHERE (tx_id, position) <= (%s::text::xid8, %s::bigint)"
_CHAIN = (  # Envelope.of's argument order, then the stored links
    "SELECT stream_id, stream_type, version, type, schema_version, occurred_at, data, metadata,"
    " prev_hash, hash FROM events ORDER BY stream_id, version"
)
_CHAIN_OF = _CHAIN.replace(" ORDER BY", " WHERE stream_id = ANY(%s) ORDER BY")
_CONFLICT_CONSTRAINT = "events_stream_version_key"
_OLDER_TRANSACTION = (
    "stream {!r}: its last event was written by a transaction that began after this one;"
    " retry the append in a new transaction"
)
_IMPORT_CHUNK = 5000


@dataclass(frozen=True)
class Backlog:
    """The events after a checkpoint: how many, and when the oldest of them was recorded."""

    events: int
    oldest_recorded_at: datetime | None


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
        params = _append_params(stream, expected_version, events, metadata or {})
        try:
            with self._connection(conn) as tx:
                positions = _insert_events(tx, params)
        except _LostRace as lost:
            # The winner committed; its version is only visible outside our failed transaction.
            actual = self.version(stream.id)
            raise ConcurrencyConflict(stream.id, expected_version, actual) from lost.__cause__
        if positions is None:
            actual = self.version(stream.id)
            why = None if actual != expected_version else _OLDER_TRANSACTION.format(stream.id)
            raise ConcurrencyConflict(stream.id, expected_version, actual, why)
        return AppendResult(expected_version + len(events), positions)

    def version(self, stream_id: str, *, conn: Connection | None = None) -> int:
        """The stream's current version; 0 when it has no events.

        With `conn`, the read runs on that connection (inside its transaction, if one is open).
        """
        with translated_errors(), self._reader(conn) as reader:
            row = reader.execute(_VERSION, (stream_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """The stream's events from `from_version` on, in version order (at most `limit`)."""
        return self._read(_READ_STREAM, (stream_id, from_version, limit))

    def read_all(
        self, after: Checkpoint = START, limit: int = 1000, *, conn: Connection | None = None
    ) -> list[RecordedEvent]:
        """Up to `limit` events after `after` in gap-safe order; a late commit is never skipped.

        With `conn`, the read runs on that connection (inside its transaction, if one is open).
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return self._read(_READ_ALL, (str(after.tx_id), after.position, limit), conn)

    def read_filtered(
        self,
        after: Checkpoint,
        limit: int,
        *,
        types: Sequence[str] | None = None,
        stream_ids: Sequence[str] | None = None,
        occurred_from: datetime | None = None,
        occurred_to: datetime | None = None,
    ) -> list[RecordedEvent]:
        """read_all restricted to some types, streams and an occurred_at range [from, to)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        type_list = None if types is None else list(types)
        stream_list = None if stream_ids is None else list(stream_ids)
        params = (
            str(after.tx_id),
            after.position,
            type_list,
            type_list,
            stream_list,
            stream_list,
            occurred_from,
            occurred_from,
            occurred_to,
            occurred_to,
            limit,
        )
        return self._read(_READ_FILTERED, params)

    def iter_all(self, after: Checkpoint = START, page: int = 10_000) -> Iterator[RecordedEvent]:
        """Every event after `after` in gap-safe order, read a page at a time."""
        while events := self.read_all(after, page):
            yield from events
            after = events[-1].checkpoint

    def read_visible(
        self, after: Checkpoint, limit: int, *, conn: Connection
    ) -> list[RecordedEvent]:
        """Like read_all, but everything committed, ignoring transactions still open.

        Only for a reader that holds locks keeping every writer of what it builds out, so that an
        open transaction cannot commit an event it would need (a rebuild's final catch-up).
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return self._read(_READ_VISIBLE, (str(after.tx_id), after.position, limit), conn)

    def read_type(
        self, type_name: str, after: Checkpoint, limit: int, *, conn: Connection | None = None
    ) -> list[RecordedEvent]:
        """read_all of the events of one type only."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = _READ_TYPE.format(type=_type_literal(type_name))
        return self._read(query, (str(after.tx_id), after.position, limit), conn)

    def recorded_within(self, type_name: str, within: timedelta) -> Checkpoint:
        """A checkpoint after which read_type finds every event of the type recorded within
        `within` of the database's clock, and nothing it could later miss: never past the
        horizon."""
        query = _FIRST_RECORDED.format(type=_type_literal(type_name))
        with translated_errors(), self._pool.connection() as conn:
            first = conn.execute(query, (within,)).fetchone()
            horizon = self.horizon(conn=conn)
        if first is None or int(first[0]) > horizon.tx_id:
            return horizon
        return Checkpoint(int(first[0]), int(first[1]) - 1)

    def horizon(self, *, conn: Connection | None = None) -> Checkpoint:
        """The last checkpoint before the oldest open transaction: everything up to it has
        committed (or never will), so a reader that starts after it misses nothing to come."""
        with translated_errors(), self._reader(conn) as reader:
            row = reader.execute(_HORIZON).fetchone()
        assert row is not None  # one row, always
        return Checkpoint(int(row[0]) - 1, MAX_POSITION)

    def read_first(
        self, stream_ids: Collection[str], *, conn: Connection | None = None
    ) -> list[RecordedEvent]:
        """The first event of each of the streams that has one, in no particular order.

        With `conn`, the read runs on that connection (inside its transaction, if one is open).
        """
        return self._read(_READ_FIRST, (list(stream_ids),), conn)

    def backlog(self, after: Checkpoint, *, conn: Connection | None = None) -> Backlog:
        """How many committed events follow `after`, and the oldest one's recorded_at.

        With `conn`, the read runs on that connection (inside its transaction, if one is open).
        """
        row = self._fetch_one(_BACKLOG, (str(after.tx_id), after.position), conn)
        count, oldest = (0, None) if row is None else row
        return Backlog(int(count), oldest)

    def count(self, up_to: Checkpoint | None = None, *, conn: Connection | None = None) -> int:
        """The number of committed events at or before `up_to` in gap-safe order (all: None).

        With `conn`, the read runs on that connection (inside its transaction, if one is open).
        """
        if up_to is None:
            row = self._fetch_one(_COUNT_ALL, (), conn)
        else:
            row = self._fetch_one(_COUNT_UP_TO, (str(up_to.tx_id), up_to.position), conn)
        return 0 if row is None else int(row[0])

    def verify(self) -> list[BrokenLink]:
        """Recompute every stream's hash chain; return each broken stream's first broken link."""
        return self.check_chains().broken

    def check_chains(self, stream_ids: Sequence[str] | None = None) -> ChainChecker:
        """Recompute every stream's hash chain (or only those of `stream_ids`): the checker,
        with what it counted and found."""
        checker = ChainChecker()
        query, params = (_CHAIN, ()) if stream_ids is None else (_CHAIN_OF, (list(stream_ids),))
        with (
            translated_errors(),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="ledger_verify") as cursor,
        ):
            cursor.itersize = 10_000
            for row in cursor.execute(query, params):
                *fields, prev_hash, stored = row
                checker.check(Envelope.of(*fields), bytes(prev_hash), bytes(stored))
        return checker

    def import_events(self, records: Iterable[ImportRecord]) -> int:
        """Bulk-append stored-form events with COPY, continuing each stream's versions and chain.

        Everything is written in one transaction: a record out of version sequence, an unknown
        type, a recorded hash that differs from the recomputed one or a concurrent writer on an
        imported stream rolls the whole import back.
        """
        heads: dict[str, tuple[int, bytes]] = {}
        count = 0
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            for chunk in _chunks(records, _IMPORT_CHUNK):
                _load_heads(conn, heads, {r.stream_id for r in chunk} - heads.keys())
                rows = [_import_row(record, heads) for record in chunk]
                try:
                    with conn.cursor().copy(_COPY) as copy:
                        for row in rows:
                            copy.write_row(row)
                except pg_errors.UniqueViolation as e:
                    raise InvalidImport("another writer appended to a stream being imported") from e
                count += len(rows)
        return count

    def _read(
        self, query: str, params: tuple[Any, ...], conn: Connection | None = None
    ) -> list[RecordedEvent]:
        with translated_errors(), self._reader(conn) as reader:
            rows = reader.cursor(binary=True).execute(query, params, prepare=True).fetchall()
        for type_name in {row[4] for row in rows}:
            event_class(type_name)  # an unknown type fails the read, not a later access
        return [RecordedEvent.from_row(row) for row in rows]

    def _fetch_one(
        self, query: str, params: tuple[Any, ...], conn: Connection | None
    ) -> tuple[Any, ...] | None:
        with translated_errors(), self._reader(conn) as reader:
            return reader.execute(query, params).fetchone()

    @contextmanager
    def _reader(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self._pool.connection() as own:
                yield own

    @contextmanager
    def _connection(self, conn: Connection | None) -> Iterator[Connection]:
        with translated_errors():
            if conn is None:
                with self._pool.connection() as own:
                    yield own
            elif conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
                raise ValueError("append(conn=...) needs a connection in a transaction")
            else:
                yield conn  # the caller commits or rolls back


class PipelinedTransaction:
    """One decision's transaction on the event loop, in two round trips (see `pipelined`)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._appended: list[tuple[str, int]] = []

    async def append(
        self,
        stream: Stream,
        expected_version: int,
        events: Sequence[Event],
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        """Queue EventStore.append's insert; a stream not at `expected_version` (or last written
        by a newer transaction) makes the whole transaction fail with ConcurrencyConflict."""
        if expected_version < 0 or not events:
            raise ValueError("append needs expected_version >= 0 and at least one event")
        for params in _append_params(stream, expected_version, events, metadata or {}):
            await self.conn.execute(_APPEND_OR_REFUSE, params, prepare=True)
        self._appended.append((stream.id, expected_version))

    async def conflict(self) -> ConcurrencyConflict:
        """The ConcurrencyConflict an aborted append stands for (read after the rollback)."""
        stream_id, expected = self._appended[0] if self._appended else ("?", 0)
        cursor = await self.conn.execute(_VERSION, (stream_id,))
        row = await cursor.fetchone()
        actual = 0 if row is None else int(row[0])
        why = None if actual != expected else _OLDER_TRANSACTION.format(stream_id)
        return ConcurrencyConflict(stream_id, expected, actual, why)


@asynccontextmanager
async def pipelined(pool: AsyncConnectionPool[Any]) -> AsyncIterator[PipelinedTransaction]:
    """A transaction whose statements travel pipelined: BEGIN goes with the first statement whose
    result is read (a row lock, say), and what is queued after the last read (appends,
    projection rows) goes with COMMIT. A failure anywhere rolls it all back; a stream found at
    another version raises ConcurrencyConflict, as EventStore.append does."""
    with translated_errors():
        async with pool.connection() as conn:
            tx = PipelinedTransaction(conn)
            try:
                async with conn.pipeline():
                    await conn.execute("BEGIN")
                    yield tx
                    await conn.execute("COMMIT")
            except (pg_errors.UniqueViolation, pg_errors.SerializationFailure) as e:
                await _rollback(conn)
                lost = isinstance(e, pg_errors.SerializationFailure) or (
                    e.diag.constraint_name == _CONFLICT_CONSTRAINT
                )
                if not lost:
                    raise
                raise await tx.conflict() from e
            except BaseException:
                await _rollback(conn)
                raise


async def _rollback(conn: AsyncConnection) -> None:
    if conn.info.transaction_status != TransactionStatus.IDLE:
        with suppress(psycopg.Error):
            await conn.execute("ROLLBACK")


def _type_literal(type_name: str) -> str:
    """A registered event type's name, safe to write into a statement between quotes."""
    event_class(type_name)  # UnknownEventType otherwise
    if not type_name.isidentifier():
        raise ValueError(f"{type_name!r} cannot be written into a statement")
    return type_name


def _append_params(
    stream: Stream, expected_version: int, events: Sequence[Event], metadata: Mapping[str, object]
) -> list[dict[str, Any]]:
    metadata_json = canonical_json(to_json_value(metadata, "$metadata"))
    params = []
    for prev, event in enumerate(events, start=expected_version):
        data_json = canonical_json(event_data(event))  # refuses classes that are not registered
        cls = type(event)
        envelope = Envelope(
            stream.id,
            stream.type,
            prev + 1,
            cls.type_name,
            cls.schema_version,
            event.occurred_at,
            data_json,
            metadata_json,
        )
        params.append(
            {
                "stream_id": stream.id,
                "stream_type": stream.type,
                "prev": prev,
                "type": envelope.type,
                "schema_version": envelope.schema_version,
                "data": envelope.data_json,
                "metadata": metadata_json,
                "occurred_at": envelope.occurred_at,
                "body": envelope.body(),
                "genesis": GENESIS,
            }
        )
    return params


def _insert_events(conn: Connection, params: list[dict[str, Any]]) -> tuple[int, ...] | None:
    """Insert the events; None when the expected version is ahead of the stream (nothing written).

    Pipelined into one round trip. On an idle autocommit connection a single event is its own
    transaction and several get one; otherwise they join the connection's open transaction
    (psycopg's transaction() would commit one that was begun implicitly).
    """
    try:
        if len(params) == 1:
            rows = conn.execute(_APPEND, params[0], prepare=True).fetchall()
        else:
            own = conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE
            with conn.pipeline(), conn.transaction() if own else nullcontext():
                cursors = [conn.execute(_APPEND, p, prepare=True) for p in params]
            rows = [row for cursor in cursors for row in cursor.fetchall()]
    except pg_errors.UniqueViolation as e:
        if e.diag.constraint_name != _CONFLICT_CONSTRAINT:
            raise
        raise _LostRace from e
    if len(rows) < len(params):
        # Only the first event can miss its predecessor, and then every later one misses too.
        return None
    return tuple(int(row[0]) for row in rows)


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
    for stream_id, version, hash_, newer in conn.execute(_HEADS, (list(streams),)):
        if newer:  # the same ordering rule as append's
            raise InvalidImport(f"stream {stream_id!r} was appended to during the import; retry")
        heads[stream_id] = (int(version), bytes(hash_))


def _import_row(record: ImportRecord, heads: dict[str, tuple[int, bytes]]) -> tuple[Any, ...]:
    version, prev_hash = heads[record.stream_id]
    if record.version != version + 1:
        raise InvalidImport(
            f"stream {record.stream_id!r}: version {record.version} cannot follow version {version}"
        )
    event_class(record.type)
    envelope = Envelope.of(
        record.stream_id,
        record.stream_type,
        record.version,
        record.type,
        record.schema_version,
        record.occurred_at,
        to_json_value(record.data, "$data"),
        to_json_value(record.metadata, "$metadata"),
    )
    link = envelope.link_hash(prev_hash)
    if record.hash is not None and record.hash != link:
        raise InvalidImport(
            f"stream {record.stream_id!r} version {record.version}: the recomputed hash"
            f" {link.hex()} differs from the recorded {record.hash.hex()} (the event or one"
            " before it in its stream was changed)"
        )
    heads[record.stream_id] = (record.version, link)
    return (
        envelope.stream_id,
        envelope.stream_type,
        envelope.version,
        envelope.type,
        envelope.schema_version,
        envelope.data_json,
        envelope.metadata_json,
        envelope.occurred_at,
        prev_hash,
        link,
    )
