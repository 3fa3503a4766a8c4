"""Export of the event log to JSONL, CSV or Parquet in constant memory, and JSONL read back.

An export is one snapshot: it runs in a single REPEATABLE READ, READ ONLY transaction, so it holds
exactly the events committed when it began (every stream a prefix of itself, nothing half-written)
and its progress total comes from the same snapshot. Rows are in `position` order. That is each
stream's version order, which is what an import must replay; the catch-up order (tx_id, position)
is not: a transaction that took its id early can append a stream's next version after a later-id
transaction appended the one before. Each row carries `tx_id` for readers who want that order.

Columns, in this order in every format: position, stream_id, stream_type, version, type,
schema_version, occurred_at, recorded_at, tx_id, data, metadata, prev_hash, hash. Timestamps are
ISO 8601 UTC with microseconds and a trailing Z (Parquet: timestamp[us, tz=UTC]); hashes are
lowercase hex in every format, so rows compare equal whichever file they came from; data and
metadata are JSON objects in JSONL and JSON text in CSV and Parquet; Parquet integers are int64.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from ledger.db import translated_errors
from ledger.errors import InvalidExport, InvalidImport, SerializationError
from ledger.events import event_class, registered_types, unknown_types
from ledger.records import ImportRecord
from ledger.serialization import JsonValue, to_json_value
from ledger.store import EventStore

Connection = psycopg.Connection[TupleRow]
Progress = Callable[[int, int], None]
"""Called with (events written, events in the export) as an export goes on."""

BATCH_SIZE = 50_000

# Every value travels as a parameter; the NULL tests fold away once the values are known.
_WHERE = """
 WHERE (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL OR occurred_at < %(until)s::timestamptz)
   AND (%(types)s::text[] IS NULL OR type = ANY(%(types)s::text[]))
"""
_UTC_TEXT = "to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS {0}"
_TEXT_COLUMNS = (
    "position, stream_id, stream_type, version, type, schema_version,"
    f" {_UTC_TEXT.format('occurred_at')}, {_UTC_TEXT.format('recorded_at')},"
    " tx_id::text::bigint AS tx_id, data, metadata,"
    " encode(prev_hash, 'hex') AS prev_hash, encode(hash, 'hex') AS hash"
)
_SELECT_TEXT = f"SELECT {_TEXT_COLUMNS} FROM events {_WHERE}"  # noqa: S608
_COUNT = f"SELECT count(*) FROM events {_WHERE}"  # noqa: S608
# COPY's text format would escape every backslash in the JSON; CSV with a quote character that
# JSON text never holds raw (control characters are escaped as \uXXXX) passes each line as it is.
_COPY_JSONL = (
    f"COPY (SELECT row_to_json(e) FROM ({_SELECT_TEXT}) AS e ORDER BY e.position)"  # noqa: S608
    " TO STDOUT WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')"
)
_COPY_CSV = f"COPY ({_SELECT_TEXT} ORDER BY position) TO STDOUT WITH (FORMAT csv, HEADER)"


class ExportFormat(StrEnum):
    """The file formats an export writes."""

    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


@dataclass(frozen=True)
class ExportFilter:
    """Which events an export holds; the default holds every event."""

    since: datetime | None = None
    """Only events that occurred at or after this (aware) time."""
    until: datetime | None = None
    """Only events that occurred before this (aware) time."""
    types: tuple[str, ...] = ()
    """Only events of these registered type names; empty for every type."""


def export_events(
    pool: ConnectionPool,
    path: Path,
    fmt: ExportFormat,
    where: ExportFilter = ExportFilter(),
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Write the events `where` selects to `path` from one snapshot; return how many it wrote.

    Memory stays bounded by `batch_size` rows whatever the ledger's size. The file appears under
    its name only when complete (written beside it, then renamed), readable by its owner only as
    it holds addresses and user agents. `progress` is called after every `batch_size` events.
    """
    params = _filter_params(where)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    partial = Path(name)
    try:
        with _snapshot(pool) as conn:
            count = _write(conn, partial, fmt, params, progress or _ignore, batch_size)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def read_jsonl(path: Path) -> Iterator[ImportRecord]:
    """Read an export's JSONL file one line at a time as import records, carrying each hash.

    A malformed line, a missing or mistyped field or an unknown event type raises InvalidImport
    naming the line; blank lines are skipped.
    """
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield _line_record(line, number)


def import_jsonl(pool: ConnectionPool, path: Path, *, append: bool = False) -> int:
    """Import an export's JSONL file in one transaction, keeping versions and hash chains.

    Refuses a ledger that already holds events unless `append`; any refused line or event writes
    nothing. Another writer that appends between the check and the import makes the ledger
    non-empty as `append` would; one that appends to an imported stream fails the import.
    """
    if not append:
        _refuse_a_ledger_with_events(pool)
    return EventStore(pool).import_events(read_jsonl(path))


def _filter_params(where: ExportFilter) -> dict[str, Any]:
    unknown = unknown_types(where.types)
    if unknown:
        known = [cls.type_name for cls in registered_types()]
        raise InvalidExport(
            f"unknown event type(s) {', '.join(unknown)}; known types: {', '.join(known)}"
        )
    for name, value in (("since", where.since), ("until", where.until)):
        if value is not None and value.utcoffset() is None:
            raise InvalidExport(f"{name} {value.isoformat()} has no time zone")
    if where.since is not None and where.until is not None and where.since >= where.until:
        raise InvalidExport("since must be before until")
    return {"since": where.since, "until": where.until, "types": list(where.types) or None}


@contextmanager
def _snapshot(pool: ConnectionPool) -> Iterator[Connection]:
    with translated_errors(), pool.connection() as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield conn


def _write(
    conn: Connection,
    path: Path,
    fmt: ExportFormat,
    params: dict[str, Any],
    progress: Progress,
    batch_size: int,
) -> int:
    row = conn.execute(_COUNT, params).fetchone()
    report = _Reporter(progress, 0 if row is None else int(row[0]))
    report(0)
    if fmt is ExportFormat.PARQUET:
        from ledger.parquet import write_parquet  # pyarrow only where it is used (see there)

        count = write_parquet(conn, path, _COPY_CSV, params, report, batch_size)
    else:
        query, header = (_COPY_CSV, 1) if fmt is ExportFormat.CSV else (_COPY_JSONL, 0)
        with path.open("wb", buffering=1 << 20) as out:
            count = _copy_out(conn, query, params, out, header, report, batch_size)
    report(count)
    return count


class _Reporter:
    """Passes (done, total) to a Progress callback, once for each new count."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress, self._total, self._last = progress, total, -1

    def __call__(self, done: int) -> None:
        if done != self._last:
            self._last = done
            self._progress(done, self._total)


def _copy_out(
    conn: Connection,
    query: str,
    params: dict[str, Any],
    out: BinaryIO,
    header: int,
    progress: Callable[[int], None],
    batch_size: int,
) -> int:
    """Stream COPY output into `out`; PostgreSQL sends each row (and the header) as one message."""
    messages = 0
    with conn.cursor() as cursor:
        with cursor.copy(query, params) as copy:
            for data in copy:
                out.write(data)
                messages += 1
                if messages > header and (messages - header) % batch_size == 0:
                    out.flush()  # what is reported as done is on its way to the disk
                    progress(messages - header)
        return cursor.rowcount


def _ignore(done: int, total: int) -> None:
    pass


def _refuse_a_ledger_with_events(pool: ConnectionPool) -> None:
    with translated_errors(), pool.connection() as conn:
        row = conn.execute("SELECT EXISTS (SELECT FROM events)").fetchone()
    if row is not None and row[0]:
        raise InvalidImport(
            "the ledger already holds events; import into an empty database, or append on purpose"
        )


_FIELDS: dict[str, type] = {
    "stream_id": str,
    "stream_type": str,
    "version": int,
    "type": str,
    "schema_version": int,
    "occurred_at": str,
    "data": dict,
    "metadata": dict,
}
_KINDS = {str: "a string", int: "an integer", dict: "a JSON object"}


def _line_record(line: bytes, number: int) -> ImportRecord:
    try:
        return _record(json.loads(line))
    except json.JSONDecodeError as e:
        raise InvalidImport(f"line {number}: not JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, SerializationError) as e:  # ValueError includes bad UTF-8
        raise InvalidImport(f"line {number}: {e}") from None


def _record(value: object) -> ImportRecord:
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    missing = [name for name in _FIELDS if name not in value]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for name, kind in _FIELDS.items():
        field = value[name]
        if not isinstance(field, kind) or (kind is int and isinstance(field, bool)):
            raise ValueError(f"{name} must be {_KINDS[kind]}, not {json.dumps(field)[:40]}")
    known = event_class(value["type"]).schema_version  # unknown types are refused with the line
    if not 1 <= value["schema_version"] <= known:
        raise ValueError(f"{value['type']} has schema versions 1 to {known} only")
    return ImportRecord(
        value["stream_id"],
        value["stream_type"],
        value["version"],
        value["type"],
        value["schema_version"],
        _timestamp(value["occurred_at"]),
        _object(value["data"], "data"),
        _object(value["metadata"], "metadata"),
        _hash(value.get("hash")),
    )


def _timestamp(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"occurred_at {text!r} is not an ISO 8601 timestamp") from None
    if parsed.utcoffset() is None:
        raise ValueError(f"occurred_at {text!r} has no time zone")
    return parsed


def _object(value: dict[str, object], name: str) -> dict[str, JsonValue]:
    plain = to_json_value(value, f"${name}")  # floats, NUL and bad Unicode are refused by path
    assert isinstance(plain, dict)
    return plain


def _hash(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ValueError(f"hash must be 64 hex digits, not {json.dumps(value)[:80]}")
