"""The per-stream hash chain: each event's hash covers the previous hash and its canonical bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from ledger.serialization import JsonValue, canonical_bytes, format_timestamp

GENESIS = bytes(32)


@dataclass(frozen=True)
class Envelope:
    """Everything about an event that the hash chain protects."""

    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    occurred_at: datetime
    data: dict[str, JsonValue]
    metadata: dict[str, JsonValue]

    def link_hash(self, prev_hash: bytes) -> bytes:
        """The hash of this event when it follows an event whose hash is `prev_hash`."""
        body: JsonValue = {
            "stream_id": self.stream_id,
            "stream_type": self.stream_type,
            "version": self.version,
            "type": self.type,
            "schema_version": self.schema_version,
            "occurred_at": format_timestamp(self.occurred_at),
            "data": self.data,
            "metadata": self.metadata,
        }
        return hashlib.sha256(prev_hash + canonical_bytes(body)).digest()


@dataclass(frozen=True)
class BrokenLink:
    """The first event of a stream whose stored chain does not match the recomputed one."""

    stream_id: str
    version: int
    expected: str
    found: str
    reason: str

    def __str__(self) -> str:
        return (
            f"stream {self.stream_id} version {self.version}: {self.reason} "
            f"(expected {self.expected}, found {self.found})"
        )


class ChainChecker:
    """Walks events ordered by stream and version and records the first broken link per stream."""

    def __init__(self) -> None:
        self.broken: list[BrokenLink] = []
        self._stream: str | None = None
        self._version = 0
        self._hash = GENESIS
        self._stream_broken = False

    def check(self, envelope: Envelope, prev_hash: bytes, stored_hash: bytes) -> None:
        """Check one stored event against the chain so far."""
        if envelope.stream_id != self._stream:
            self._stream, self._version, self._hash = envelope.stream_id, 0, GENESIS
            self._stream_broken = False
        if not self._stream_broken:
            self._check_link(envelope, prev_hash, stored_hash)
        self._version, self._hash = envelope.version, stored_hash

    def _check_link(self, envelope: Envelope, prev_hash: bytes, stored_hash: bytes) -> None:
        version = envelope.version
        if version != self._version + 1:
            self._fail(version, str(self._version + 1), str(version), "version out of sequence")
        elif prev_hash != self._hash:
            self._fail(version, self._hash.hex(), prev_hash.hex(), "prev_hash does not match")
        elif (recomputed := envelope.link_hash(prev_hash)) != stored_hash:
            self._fail(version, recomputed.hex(), stored_hash.hex(), "hash does not match content")

    def _fail(self, version: int, expected: str, found: str, reason: str) -> None:
        assert self._stream is not None
        self.broken.append(BrokenLink(self._stream, version, expected, found, reason))
        self._stream_broken = True
