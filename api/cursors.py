"""Opaque cursors over the gap-safe `(tx_id, position)` order, as the audit API and the
session-end feed hand them out: a reader that resumes after one misses nothing and sees nothing
twice."""

from __future__ import annotations

import base64
import binascii

from api.errors import InvalidRequest
from ledger.records import MAX_POSITION, Checkpoint

MAX_BIGINT = MAX_POSITION
_MAX_CURSOR_CHARS = 64


def encode_cursor(checkpoint: Checkpoint) -> str:
    raw = f"{checkpoint.tx_id}:{checkpoint.position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Checkpoint:
    """The checkpoint a cursor stands for; InvalidRequest for anything this server did not
    hand out."""
    if len(text) > _MAX_CURSOR_CHARS:
        raise InvalidRequest("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        tx_id, position = (int(part) for part in raw.split(":"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("malformed cursor") from None
    if not (0 <= tx_id <= MAX_BIGINT and 0 <= position <= MAX_BIGINT):
        raise InvalidRequest("malformed cursor")
    return Checkpoint(tx_id, position)
