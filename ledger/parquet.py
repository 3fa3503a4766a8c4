"""Parquet export: Arrow parses the CSV export's COPY stream and writes row groups.

Its own module, imported only when a Parquet export runs: pyarrow costs every process that
imports it about 40 MiB, and the API's worker processes never write Parquet.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import Copy
from psycopg.rows import TupleRow

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Connection = psycopg.Connection[TupleRow]

_UTC_MICROSECONDS = pa.timestamp("us", tz="UTC")
PARQUET_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("stream_id", pa.string()),
        ("stream_type", pa.string()),
        ("version", pa.int64()),
        ("type", pa.string()),
        ("schema_version", pa.int64()),
        ("occurred_at", _UTC_MICROSECONDS),
        ("recorded_at", _UTC_MICROSECONDS),
        ("tx_id", pa.int64()),
        ("data", pa.string()),
        ("metadata", pa.string()),
        ("prev_hash", pa.string()),
        ("hash", pa.string()),
    ]
)


def write_parquet(
    conn: Connection,
    path: Path,
    query: str,
    params: dict[str, Any],
    progress: Callable[[int], None],
    batch_size: int,
) -> int:
    """Parse the CSV COPY stream of `query` with Arrow and write a row group per `batch_size` rows.

    PostgreSQL renders the rows and Arrow parses them in C++: about twice as fast as building
    the columns from a cursor's Python tuples, and the same query as the CSV export.
    """
    done = 0
    with (
        conn.cursor() as cursor,
        cursor.copy(query, params) as copy,
        pq.ParquetWriter(path, PARQUET_SCHEMA, compression="zstd") as writer,
    ):
        for table in _tables(io.BufferedReader(_CopyStream(copy)), batch_size):
            writer.write_table(table, row_group_size=batch_size)
            done += table.num_rows
            progress(done)
    return done


def _tables(csv: BinaryIO, batch_size: int) -> Iterator[pa.Table]:
    """The CSV as tables of `batch_size` rows (the last one fewer), holding at most one more."""
    reader = pacsv.open_csv(
        csv,
        # Arrow reads ahead a block at a time: 1 MiB (its default), less for small batches.
        read_options=pacsv.ReadOptions(block_size=min(max(batch_size * 64, 1 << 16), 1 << 20)),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=PARQUET_SCHEMA),
    )
    pending = PARQUET_SCHEMA.empty_table()
    for batch in reader:
        pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
        while pending.num_rows >= batch_size:
            yield pending.slice(0, batch_size)
            pending = pending.slice(batch_size)
    if pending.num_rows:
        yield pending


class _CopyStream(io.RawIOBase):
    """COPY output as a readable byte stream, for a reader that pulls (Arrow's CSV reader)."""

    def __init__(self, copy: Copy) -> None:
        self._messages = iter(copy)
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        parts, size = [self._rest], len(self._rest)
        while size < len(view) and (message := next(self._messages, None)) is not None:
            parts.append(bytes(message))
            size += len(message)
        data = b"".join(parts)
        count = min(len(view), len(data))
        view[:count] = data[:count]
        self._rest = data[count:]
        return count
