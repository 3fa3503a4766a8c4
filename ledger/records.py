"""The shapes the event store takes and returns: streams, checkpoints and stored events."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import NamedTuple

from ledger.events import Event, decode_event
from ledger.serialization import JsonValue


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
MAX_POSITION = 2**63 - 1
"""The largest tx_id or position a checkpoint can hold (PostgreSQL's bigint)."""


@dataclass(frozen=True)
class AppendResult:
    """What an append wrote: the stream's new version and the events' global positions."""

    version: int
    positions: tuple[int, ...]


class _StoredRow(NamedTuple):
    position: int
    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    tx_id: int
    data_json: str
    metadata_json: str


class RecordedEvent(_StoredRow):
    """An event as stored: immutable fields, payload decoded on first access to `event`.

    Readers that route on `type` or `stream_type`, or copy `data_json` out as it is, never pay
    for decoding payloads they do not use; the type itself is checked when the row is read.
    A tuple underneath, because readers build one per event and construction bounds throughput.
    """

    @classmethod
    def from_row(cls, row: Sequence[object]) -> RecordedEvent:
        """Build from a row in field order (the store's select list)."""
        return tuple.__new__(cls, row)

    @cached_property
    def event(self) -> Event:
        """The decoded (and, for older schema versions, upcast) event."""
        data = json.loads(self.data_json)
        return decode_event(self.type, self.schema_version, data, self.occurred_at)

    @cached_property
    def data(self) -> dict[str, JsonValue]:
        """The payload as stored (before upcasting), as plain JSON."""
        value: dict[str, JsonValue] = json.loads(self.data_json)
        return value

    @cached_property
    def metadata(self) -> dict[str, JsonValue]:
        """The metadata recorded with the event (request id, address, user agent, ...)."""
        value: dict[str, JsonValue] = json.loads(self.metadata_json)
        return value

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
    # The hash the event had where it came from (an export). When given, the import refuses the
    # event unless the hash it recomputes is the same: a changed export must not load silently.
    hash: bytes | None = None
