"""Canonical JSON: one byte string per value, stable across processes, for storage and hashing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
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
    chain; strings may not hold NUL, which jsonb cannot store.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _checked_string(value, path)
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, list | tuple):
        return [to_json_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {_checked_key(k, path): to_json_value(v, f"{path}.{k}") for k, v in value.items()}
    raise SerializationError(f"{path}: values of type {type(value).__name__} cannot be stored")


def canonical_bytes(value: JsonValue) -> bytes:
    """Encode plain JSON with sorted keys, no spaces, in UTF-8: equal values give equal bytes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _checked_string(value: str, path: str) -> str:
    if "\x00" in value:
        raise SerializationError(f"{path}: strings may not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SerializationError(f"{path}: string is not valid Unicode ({e.reason})") from e
    return value


def _checked_key(key: object, path: str) -> str:
    if not isinstance(key, str):
        raise SerializationError(f"{path}: object keys must be strings, not {type(key).__name__}")
    return _checked_string(key, path)
