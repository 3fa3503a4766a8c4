"""The per-stream hash chain: each event's hash covers the previous hash and its canonical bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from ledger.serialization import JsonValue, canonical_json, format_timestamp, json_string

GENESIS = bytes(32)


@dataclass(frozen=True)
class Envelope:
    """Everything about an event that the hash chain protects; payloads as canonical JSON text."""

    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    occurred_at: datetime
    data_json: str
    metadata_json: str

    def body(self) -> bytes:
        """The canonical bytes of the whole envelope, as canonical_bytes would encode it as a dict.

        Assembled from the already canonical payload texts (keys in sorted order) so that a large
        payload is encoded once, not twice; a property test holds it equal to canonical_bytes.
        """
        return (
            f'{{"data":{self.data_json},"metadata":{self.metadata_json},'
            f'"occurred_at":"{format_timestamp(self.occurred_at)}",'
            f'"schema_version":{self.schema_version},"stream_id":{json_string(self.stream_id)},'
            f'"stream_type":{json_string(self.stream_type)},"type":{json_string(self.type)},'
            f'"version":{self.version}}}'
        ).encode()

    def link_hash(self, prev_hash: bytes) -> bytes:
        """The hash of this event when it follows an event whose hash is `prev_hash`."""
        return hashlib.sha256(prev_hash + self.body()).digest()

    @classmethod
    def of(
        cls,
        stream_id: str,
        stream_type: str,
        version: int,
        type_name: str,
        schema_version: int,
        occurred_at: datetime,
        data: JsonValue,
        metadata: JsonValue,
    ) -> Envelope:
        """An envelope of plain JSON payloads (as read back from jsonb)."""
        data_json = canonical_json(data)
        metadata_json = canonical_json(metadata)
        return cls(
            stream_id,
            stream_type,
            version,
            type_name,
            schema_version,
            occurred_at,
            data_json,
            metadata_json,
        )


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
        self.events = 0
        self.streams = 0
        self._stream: str | None = None
        self._version = 0
        self._hash = GENESIS
        self._stream_broken = False

    def check(self, envelope: Envelope, prev_hash: bytes, stored_hash: bytes) -> None:
        """Check one stored event against the chain so far."""
        self.events += 1
        if envelope.stream_id != self._stream:
            self._stream, self._version, self._hash = envelope.stream_id, 0, GENESIS
            self._stream_broken = False
            self.streams += 1
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
