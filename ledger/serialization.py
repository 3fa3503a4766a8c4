"""Canonical JSON: one byte string per value, stable across processes, for storage and hashing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import TypeAlias

from ledger.errors import SerializationError

JsonValue: TypeAlias = "str | int | bool | list[JsonValue] | dict[str, JsonValue] | None"


def format_timestamp(value: datetime) -> str:
    """Render an aware datetime as UTC ISO 8601 with microseconds and a trailing Z."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise SerializationError(f"timestamp {value.isoformat()} has no time zone")
    utc = value.astimezone(UTC).isoformat(timespec="microseconds")
    return utc.removesuffix("+00:00") + "Z"


def parse_timestamp(text: str) -> datetime:
    """Read a timestamp written by format_timestamp back into an aware UTC datetime."""
    if not text.endswith("Z"):
        raise SerializationError(f"malformed timestamp {text!r}: expected UTC with a trailing Z")
    try:
        parsed = datetime.fromisoformat(text[:-1])
    except ValueError as e:
        raise SerializationError(f"malformed timestamp {text!r}") from e
    if parsed.tzinfo is not None:
        raise SerializationError(f"malformed timestamp {text!r}: two time zones")
    return parsed.replace(tzinfo=UTC)


def to_json_value(value: object, path: str = "$") -> JsonValue:
    """Convert a value to plain JSON, refusing anything PostgreSQL's jsonb would not keep exactly.

    Floats are refused because jsonb normalises their text (and -0.0), which would break the hash
    chain; strings may not hold NUL, which jsonb cannot store. The error names the value's path.
    """
    try:
        return _plain(value)
    except _Refused as e:
        raise SerializationError(f"{path}{''.join(reversed(e.steps))}: {e.reason}") from None


def canonical_json(value: JsonValue) -> str:
    """Plain JSON as text with sorted keys and no spaces: equal values give equal text."""
    return _ENCODER.encode(value)


def json_string(value: str) -> str:
    """A string as canonical_json writes it (a JSON string literal, non-ASCII kept as is)."""
    return encode_basestring(value)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Refused(Exception):
    """A value that cannot be stored; `steps` collects its path from the inside out."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.steps: list[str] = []


def _plain(value: object) -> JsonValue:
    # Paths are only built on the way out of a failure: the common case allocates none.
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _checked_string(value)
    if isinstance(value, Mapping):
        plain: dict[str, JsonValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Refused(f"object keys must be strings, not {type(key).__name__}")
            name = _checked_string(key)
            try:
                plain[name] = _plain(item)
            except _Refused as e:
                e.steps.append(f".{key}")
                raise
        return plain
    if isinstance(value, list | tuple):
        items: list[JsonValue] = []
        for index, item in enumerate(value):
            try:
                items.append(_plain(item))
            except _Refused as e:
                e.steps.append(f"[{index}]")
                raise
        return items
    if isinstance(value, datetime):
        return format_timestamp(value)
    raise _Refused(f"values of type {type(value).__name__} cannot be stored")


def _checked_string(value: str) -> str:
    if "\x00" in value:
        raise _Refused("strings may not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")  # lone surrogates cannot be stored
        except UnicodeEncodeError as e:
            raise _Refused(f"string is not valid Unicode ({e.reason})") from None
    return value
