"""Pure tests of the hash chain's canonical body and of the chain checker."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from ledger.chain import GENESIS, ChainChecker, Envelope
from ledger.serialization import JsonValue, canonical_json, format_timestamp, to_json_value
from tests.strategies import aware_datetimes, json_objects, text

envelopes = st.builds(
    Envelope.of,
    text,
    text,
    st.integers(1, 2**31 - 1),
    text,
    st.integers(1, 32767),
    aware_datetimes,
    json_objects,
    json_objects,
)


@given(envelopes)
def test_body_equals_the_canonical_encoding_of_the_whole_envelope(envelope: Envelope) -> None:
    whole = to_json_value(
        {
            "stream_id": envelope.stream_id,
            "stream_type": envelope.stream_type,
            "version": envelope.version,
            "type": envelope.type,
            "schema_version": envelope.schema_version,
            "occurred_at": format_timestamp(envelope.occurred_at),
            "data": _loads(envelope.data_json),
            "metadata": _loads(envelope.metadata_json),
        }
    )
    assert envelope.body() == canonical_json(whole).encode()


def _loads(text: str) -> JsonValue:
    value: JsonValue = json.loads(text)
    return value


@given(envelopes)
def test_link_hash_covers_the_previous_hash(envelope: Envelope) -> None:
    other = hashlib.sha256(b"other").digest()
    assert envelope.link_hash(GENESIS) != envelope.link_hash(other)
    assert envelope.link_hash(GENESIS) == hashlib.sha256(GENESIS + envelope.body()).digest()


def _chain(stream: str, count: int) -> list[tuple[Envelope, bytes, bytes]]:
    links, prev = [], GENESIS
    for version in range(1, count + 1):
        envelope = Envelope.of(stream, "session", version, "X", 1, _T, {"n": version}, {})
        link = envelope.link_hash(prev)
        links.append((envelope, prev, link))
        prev = link
    return links


_T = datetime(2026, 1, 1, tzinfo=UTC)


def test_checker_reports_only_the_first_broken_link_of_each_stream() -> None:
    checker = ChainChecker()
    first, second = _chain("a", 4), _chain("b", 2)
    tampered = Envelope.of("a", "session", 2, "X", 1, _T, {"n": 99}, {})
    first[1] = (tampered, first[1][1], first[1][2])
    for envelope, prev, link in first + second:
        checker.check(envelope, prev, link)
    assert [(b.stream_id, b.version, b.reason) for b in checker.broken] == [
        ("a", 2, "hash does not match content")
    ]
