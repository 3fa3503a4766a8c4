"""Strict parsing of form-encoded OAuth requests and of client authentication."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from fastapi import Request

from api.errors import InvalidClient, InvalidRequest

MAX_BODY_BYTES = 16 * 1024
MAX_FIELD_CHARS = 2048
MAX_FIELDS = 20
FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


async def read_form(request: Request) -> dict[str, str]:
    """The request's form fields; anything malformed, repeated or oversized is invalid_request."""
    return parse_form(await read_body(request, FORM_TYPE))


async def read_body(request: Request, content_type: str) -> bytes:
    """The body of a request that must be of `content_type`, refused past MAX_BODY_BYTES."""
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if sent != content_type:
        raise InvalidRequest(f"the request body must be {content_type}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise InvalidRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes")
    return bytes(body)


def parse_form(body: bytes) -> dict[str, str]:
    """Parse a form body strictly: UTF-8 only, each field at most once and of bounded length."""
    if body.count(b"&") >= MAX_FIELDS:
        raise InvalidRequest(f"more than {MAX_FIELDS} parameters")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the form is not valid UTF-8 form encoding") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise InvalidRequest(f"parameter {name!r} is repeated")
        if len(value) > MAX_FIELD_CHARS or len(name) > 64:
            raise InvalidRequest(f"parameter {name[:64]!r} is too long")
        if "\x00" in name or "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise InvalidRequest("parameters may not contain NUL characters")
        form[name] = value
    return form


def required(form: dict[str, str], name: str) -> str:
    """A parameter that must be present and non-empty."""
    value = form.get(name, "")
    if not value:
        raise InvalidRequest(f"parameter {name!r} is missing")
    return value


@dataclass(frozen=True)
class ClientCredentials:
    """What the request claims about its client: the id and, for confidential clients, a secret."""

    client_id: str
    secret: str | None


def client_credentials(request: Request, form: dict[str, str]) -> ClientCredentials | None:
    """The client credentials of the request (RFC 6749 §2.3.1); None when it names no client."""
    header = request.headers.get("authorization")
    if header is not None and header[:6].lower() == "basic ":
        if "client_secret" in form:
            raise InvalidRequest("use one client authentication method, not two")
        client_id, secret = _basic(header[6:])
        if form.get("client_id", client_id) != client_id:
            raise InvalidRequest("client_id differs from the authenticated client")
        return ClientCredentials(client_id, secret)
    posted_id = form.get("client_id")
    if not posted_id:
        return None
    posted_secret = form.get("client_secret")
    return ClientCredentials(posted_id, posted_secret)


def _basic(encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon or not client_id:
        raise InvalidClient("malformed Basic credentials")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body; anything else, or a repeated key, is invalid_request."""
    body = await read_body(request, JSON_TYPE)
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("a key is repeated")
    return value


def required_json_text(body: dict[str, Any], name: str) -> str:
    """json_text of a field that must be present."""
    value = json_text(body, name)
    if value is None:
        raise InvalidRequest(f"field {name!r} is missing")
    return value


def json_text(body: dict[str, Any], name: str) -> str | None:
    """A JSON body's field, which must be a non-empty string of bounded length when present."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"field {name!r} must be a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidRequest(f"field {name!r} is too long")
    if "\x00" in value:
        raise InvalidRequest(f"field {name!r} contains a NUL character")
    return value
