"""Export to JSONL, CSV and Parquet, read back by pyarrow, pandas and DuckDB; import of JSONL."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from ledger.chain import GENESIS, Envelope
from ledger.db import open_pool
from ledger.errors import InvalidExport, InvalidImport
from ledger.events import (
    LoginFailed,
    PrincipalLocked,
    RefreshTokenReuseDetected,
    RefreshTokenRotated,
    SessionEnded,
    SessionStarted,
)
from ledger.export import (
    ExportFilter,
    ExportFormat,
    export_events,
    import_jsonl,
    read_jsonl,
)
from ledger.parquet import PARQUET_SCHEMA
from ledger.store import EventStore, ImportRecord, Stream

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
# Quotes, backslashes, a comma, a newline, a control character and non-ASCII: every format must
# carry them through unchanged.
AGENT = 'Mozilla/5.0 "quoted", back\\slash\nnext line \x01 é 🙂'
JSONL, CSV, PARQUET = ExportFormat.JSONL, ExportFormat.CSV, ExportFormat.PARQUET
STORED = (
    "SELECT position, stream_id, stream_type, version, type, schema_version, occurred_at,"
    " recorded_at, tx_id::text::bigint AS tx_id, data, metadata,"
    " encode(prev_hash, 'hex') AS prev_hash, encode(hash, 'hex') AS hash"
    " FROM events ORDER BY position"
)
# What an import keeps; position, recorded_at and tx_id are the importing database's own.
CONTENT = (
    *("stream_id", "stream_type", "version", "type", "schema_version", "occurred_at"),
    *("data", "metadata", "prev_hash", "hash"),
)
Row = dict[str, Any]


def write_history(store: EventStore, sessions: int = 3) -> int:
    """Sessions with every kind of payload, and a principal stream; returns the event count."""
    for n in range(1, sessions + 1):
        stream, at = Stream(f"session:s-{n}", "session"), T0 + timedelta(hours=n)
        meta = {"ip": "192.0.2.7", "user_agent": AGENT, "request": {"id": f"r-{n}", "n": [1, 2]}}
        started = SessionStarted(
            occurred_at=at, user="ada", client_id="spa", scope=("read",),
            refresh_token_hash="ab" * 32, ip="192.0.2.7", user_agent=AGENT,
        )  # fmt: skip
        rotated = RefreshTokenRotated(
            occurred_at=at + timedelta(minutes=1), generation=2, refresh_token_hash="cd" * 32,
            ip=None, user_agent=AGENT,
        )  # fmt: skip
        reuse = RefreshTokenReuseDetected(
            occurred_at=at + timedelta(minutes=2, microseconds=7), presented_generation=1,
            current_generation=2, first_use={"ip": "192.0.2.7"}, grace_retries=({"generation": 1},),
            reuse={"ua": AGENT, "n": None},
        )  # fmt: skip
        ended = SessionEnded(occurred_at=reuse.occurred_at, reason="reuse_detected")
        store.append(stream, 0, [started, rotated], meta)
        store.append(stream, 2, [reuse, ended])
    failed = LoginFailed(occurred_at=T0, reason="bad password", ip=None, user_agent=AGENT)
    locked = PrincipalLocked(occurred_at=T0, until=T0 + timedelta(minutes=15), failures=5)
    store.append(Stream("principal:ada", "principal"), 0, [failed, locked], {"ip": "198.51.100.1"})
    return 4 * sessions + 2


def stored_rows(url: str) -> list[Row]:
    with psycopg.connect(url) as conn:
        cursor = conn.execute(STORED)
        names = [column.name for column in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor]


def normal(row: Row) -> Row:
    """A row from any file format as plain Python: ints, aware datetimes, decoded JSON."""
    out = dict(row)
    for name in ("position", "version", "schema_version", "tx_id"):
        out[name] = int(out[name])
    for name in ("occurred_at", "recorded_at"):
        value = out[name]
        out[name] = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    for name in ("data", "metadata"):
        out[name] = out[name] if isinstance(out[name], dict) else json.loads(out[name])
    return out


def read_back(path: Path, fmt: ExportFormat) -> list[Row]:
    if fmt is JSONL:
        rows: list[Row] = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    elif fmt is CSV:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    else:
        rows = pq.read_table(path).to_pylist()
    return [normal(row) for row in rows]


def content(rows: list[Row]) -> list[tuple[Any, ...]]:
    return [tuple(row[name] for name in CONTENT) for row in rows]


@pytest.fixture
def empty_db_url(pg_server_url: str, template_db: str) -> Iterator[str]:
    """A second fresh database with the schema and no events, to import into."""
    name = f"ledger_import_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield make_conninfo(pg_server_url, dbname=name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def empty_pool(empty_db_url: str) -> Iterator[ConnectionPool]:
    with open_pool(empty_db_url, max_size=2) as pool:
        yield pool


def test_export_then_import_into_an_empty_database_keeps_every_event_and_chain(
    store: EventStore, pool: ConnectionPool, db_url: str, empty_db_url: str,
    empty_pool: ConnectionPool, tmp_path: Path,
) -> None:  # fmt: skip
    count = write_history(store)
    path = tmp_path / "ledger.jsonl"
    assert export_events(pool, path, JSONL) == count
    assert import_jsonl(empty_pool, path) == count
    assert EventStore(empty_pool).verify() == []
    assert content(stored_rows(empty_db_url)) == content(stored_rows(db_url))
    again = tmp_path / "again.jsonl"
    export_events(empty_pool, again, JSONL)
    assert content(read_back(again, JSONL)) == content(read_back(path, JSONL))


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_each_format_reads_back_with_the_same_rows(
    store: EventStore, pool: ConnectionPool, db_url: str, tmp_path: Path, fmt: ExportFormat
) -> None:
    write_history(store)
    path = tmp_path / f"ledger.{fmt}"
    export_events(pool, path, fmt)
    assert read_back(path, fmt) == stored_rows(db_url)


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_awkward_text_columns_survive_every_format(
    store: EventStore, pool: ConnectionPool, db_url: str, tmp_path: Path, fmt: ExportFormat
) -> None:
    stream = Stream('a,"b"\r\nc\\d é \x01', "type,with\nnewline")
    store.append(stream, 0, [SessionEnded(occurred_at=T0, reason="x")], {"k\n": "\\N"})
    path = tmp_path / f"ledger.{fmt}"
    export_events(pool, path, fmt)
    assert read_back(path, fmt) == stored_rows(db_url)


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_an_empty_export_is_a_valid_file(
    pool: ConnectionPool, tmp_path: Path, fmt: ExportFormat
) -> None:
    path = tmp_path / f"ledger.{fmt}"
    assert export_events(pool, path, fmt) == 0
    assert read_back(path, fmt) == []
    if fmt is PARQUET:
        assert pq.read_schema(path).equals(PARQUET_SCHEMA)


def test_parquet_columns_have_their_documented_types(
    store: EventStore, pool: ConnectionPool, tmp_path: Path
) -> None:
    write_history(store)
    path = tmp_path / "ledger.parquet"
    export_events(pool, path, PARQUET)
    schema = pq.read_schema(path)
    assert schema.equals(PARQUET_SCHEMA)
    assert schema.field("occurred_at").type == pa.timestamp("us", tz="UTC")


@pytest.mark.parametrize(
    ("fmt", "read"),
    [
        (JSONL, lambda path: pd.read_json(path, lines=True)),
        (CSV, pd.read_csv),
        (PARQUET, pd.read_parquet),
    ],
)
def test_pandas_loads_each_format_as_written(
    store: EventStore, pool: ConnectionPool, db_url: str, tmp_path: Path, fmt: ExportFormat,
    read: Callable[[Path], pd.DataFrame],
) -> None:  # fmt: skip
    write_history(store)
    path = tmp_path / f"ledger.{fmt}"
    export_events(pool, path, fmt)
    frame = read(path)
    expected = stored_rows(db_url)
    assert list(frame.columns) == list(expected[0])
    assert frame["hash"].tolist() == [row["hash"] for row in expected]
    assert frame["stream_id"].tolist() == [row["stream_id"] for row in expected]
    assert frame["version"].tolist() == [row["version"] for row in expected]


@pytest.mark.parametrize(
    ("fmt", "reader"),
    [(JSONL, "read_json_auto"), (CSV, "read_csv_auto"), (PARQUET, "read_parquet")],
)
def test_duckdb_loads_each_format_as_written(
    store: EventStore, pool: ConnectionPool, db_url: str, tmp_path: Path, fmt: ExportFormat,
    reader: str,
) -> None:  # fmt: skip
    write_history(store)
    path = tmp_path / f"ledger.{fmt}"
    export_events(pool, path, fmt)
    query = f"SELECT stream_id, version, occurred_at, hash FROM {reader}(?) ORDER BY position"
    rows = duckdb.connect().execute(query, [str(path)]).fetchall()
    expected = [
        (r["stream_id"], r["version"], r["occurred_at"], r["hash"]) for r in stored_rows(db_url)
    ]
    assert rows == expected


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_filters_select_by_time_and_type(
    store: EventStore, pool: ConnectionPool, tmp_path: Path, fmt: ExportFormat
) -> None:
    write_history(store)
    since, until = T0 + timedelta(hours=2), T0 + timedelta(hours=3, minutes=1)
    where = ExportFilter(since, until, ("SessionStarted", "RefreshTokenRotated", "LoginFailed"))
    path = tmp_path / f"ledger.{fmt}"
    assert export_events(pool, path, fmt, where) == 3
    rows = read_back(path, fmt)
    got = [(r["stream_id"], r["version"], r["type"]) for r in rows]
    assert got == [
        ("session:s-2", 1, "SessionStarted"),
        ("session:s-2", 2, "RefreshTokenRotated"),
        ("session:s-3", 1, "SessionStarted"),  # `since` is inclusive; until is exclusive
    ]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (ExportFilter(types=("Nope",)), "unknown event type.*Nope.*known types: SessionStarted"),
        (ExportFilter(since=T0, until=T0), "since must be before until"),
        (ExportFilter(since=datetime(2026, 3, 1)), "has no time zone"),
    ],
)
def test_export_refuses_filters_that_cannot_be_met(
    pool: ConnectionPool, tmp_path: Path, where: ExportFilter, message: str
) -> None:
    with pytest.raises(InvalidExport, match=message):
        export_events(pool, tmp_path / "out.jsonl", JSONL, where)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_unless_asked(
    store: EventStore, pool: ConnectionPool, tmp_path: Path
) -> None:
    write_history(store, sessions=1)
    path = tmp_path / "ledger.csv"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        export_events(pool, path, CSV)
    assert path.read_text() == "keep me"
    assert export_events(pool, path, CSV, overwrite=True) == 6
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_export_streams_to_the_file_in_batches_while_it_reads(
    store: EventStore, pool: ConnectionPool, tmp_path: Path, fmt: ExportFormat
) -> None:
    total = write_history(store, sessions=30)  # 122 events, over 64 KiB
    path = tmp_path / f"ledger.{fmt}"
    seen: list[tuple[int, int, int]] = []

    def progress(done: int, of: int) -> None:
        (partial,) = tmp_path.glob(f".{path.name}.*.partial")
        seen.append((done, of, partial.stat().st_size))
        assert not path.exists()  # the file appears under its name only when complete

    export_events(pool, path, fmt, progress=progress, batch_size=10)
    assert [(done, of) for done, of, _ in seen] == [(n, total) for n in [*range(0, 121, 10), 122]]
    sizes = [size for _, _, size in seen[1:-1]]
    assert sizes[0] > 0
    assert sizes == sorted(set(sizes))  # written while reading, batch by batch
    assert len(read_back(path, fmt)) == total


def test_export_is_one_snapshot(store: EventStore, pool: ConnectionPool, tmp_path: Path) -> None:
    total = write_history(store, sessions=1)
    path = tmp_path / "ledger.jsonl"

    def append_meanwhile(done: int, of: int) -> None:
        if done == 0:  # after the count, before the rows: both come from the same snapshot
            late = SessionEnded(occurred_at=T0, reason="logout")
            store.append(Stream("late", "session"), 0, [late])

    assert export_events(pool, path, JSONL, progress=append_meanwhile) == total
    assert "late" not in {row["stream_id"] for row in read_back(path, JSONL)}


def test_export_lists_each_stream_in_version_order(
    store: EventStore, pool: ConnectionPool, empty_pool: ConnectionPool, tmp_path: Path
) -> None:
    # Interleaved streams; the ledger refuses a version from an older transaction
    # (test_store.py), so position, transaction and version order agree within a stream.
    first, second = Stream("session:s-1", "session"), Stream("session:s-2", "session")
    for version in range(3):
        for stream in (first, second):
            store.append(stream, version, [SessionEnded(occurred_at=T0, reason=f"{version}")])
    path = tmp_path / "ledger.jsonl"
    export_events(pool, path, JSONL)
    rows = read_back(path, JSONL)
    for stream in (first, second):
        versions = [row["version"] for row in rows if row["stream_id"] == stream.id]
        assert versions == [1, 2, 3]
    assert import_jsonl(empty_pool, path) == 6


def _exported_lines(store: EventStore, pool: ConnectionPool, tmp_path: Path) -> list[str]:
    write_history(store, sessions=2)
    path = tmp_path / "export.jsonl"
    export_events(pool, path, JSONL)
    return path.read_text("utf-8").splitlines()


def test_a_tampered_export_is_refused_naming_stream_and_version(
    store: EventStore, pool: ConnectionPool, empty_pool: ConnectionPool, empty_db_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    lines = _exported_lines(store, pool, tmp_path)
    row = json.loads(lines[7])
    row["data"]["reason"] = "logout"  # session-2's SessionEnded, rewritten
    lines[7] = json.dumps(row)
    path = tmp_path / "tampered.jsonl"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    with pytest.raises(InvalidImport, match="stream 'session:s-2' version 4: the recomputed hash"):
        import_jsonl(empty_pool, path)
    assert stored_rows(empty_db_url) == []


def changed(**fields: Any) -> Callable[[Row], str]:
    return lambda row: json.dumps({**row, **fields})


@pytest.mark.parametrize(
    ("make_line", "message"),
    [
        (lambda row: "{not json", "line 3: not JSON"),
        (lambda row: '["a list"]', "line 3: not a JSON object"),
        (lambda row: '{"stream_id": "s"}', "line 3: missing field.*stream_type, version"),
        (changed(version="2"), "line 3: version must be an integer"),
        (changed(type="Nope"), "line 3: unknown event type 'Nope'"),
        (changed(schema_version=3), "line 3: RefreshTokenReuseDetected has schema versions 1 to 2"),
        (changed(occurred_at="2026-03-01T09:00:00"), "line 3: occurred_at .* has no time zone"),
        (changed(data={"x": 1.5}), r"line 3: \$data.x: values of type float cannot be stored"),
        (changed(hash="zz"), "line 3: hash must be 64 hex digits"),
    ],
)
def test_a_malformed_line_is_refused_by_number_and_nothing_is_written(
    store: EventStore, pool: ConnectionPool, empty_pool: ConnectionPool, empty_db_url: str,
    tmp_path: Path, make_line: Callable[[Row], str], message: str,
) -> None:  # fmt: skip
    lines = _exported_lines(store, pool, tmp_path)
    lines[2] = make_line(json.loads(lines[2]))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), "utf-8")
    with pytest.raises(InvalidImport, match=message):
        import_jsonl(empty_pool, path)
    assert stored_rows(empty_db_url) == []


def test_import_refuses_a_ledger_with_events_unless_appending(
    store: EventStore, pool: ConnectionPool, empty_pool: ConnectionPool, tmp_path: Path
) -> None:
    lines = _exported_lines(store, pool, tmp_path)
    path = tmp_path / "export.jsonl"
    other = EventStore(empty_pool)
    other.append(Stream("elsewhere", "session"), 0, [SessionEnded(occurred_at=T0, reason="x")])
    with pytest.raises(InvalidImport, match="already holds events"):
        import_jsonl(empty_pool, path)
    assert import_jsonl(empty_pool, path, append=True) == len(lines)
    assert other.verify() == []


def test_read_jsonl_streams_records_with_their_hashes(
    store: EventStore, pool: ConnectionPool, tmp_path: Path
) -> None:
    lines = _exported_lines(store, pool, tmp_path)
    records = read_jsonl(tmp_path / "export.jsonl")
    first = next(records)
    assert first.hash == bytes.fromhex(json.loads(lines[0])["hash"])
    assert (first.stream_id, first.version, first.occurred_at) == (
        "session:s-1",
        1,
        T0 + timedelta(hours=1),
    )
    assert len(list(records)) == len(lines) - 1


def test_import_events_checks_a_recorded_hash(store: EventStore, db_url: str) -> None:
    record = ImportRecord("s", "session", 1, "SessionEnded", 1, T0, {"reason": "x"}, {})
    envelope = Envelope.of("s", "session", 1, "SessionEnded", 1, T0, {"reason": "x"}, {})
    with pytest.raises(InvalidImport, match="stream 's' version 2: the recomputed hash"):
        store.import_events([record, replace(record, version=2, hash=bytes(32))])
    assert stored_rows(db_url) == []
    assert store.import_events([replace(record, hash=envelope.link_hash(GENESIS))]) == 1


def test_the_service_and_its_command_line_load_pyarrow_only_for_a_parquet_export() -> None:
    # Each API worker imports the command-line module; pyarrow would cost it about 40 MiB.
    code = "import sys, api.cli, api.http.app; print('pyarrow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
