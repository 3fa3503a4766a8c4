"""The OpenAPI contract the routes parse by hand: request bodies, response bodies, error responses.

The OAuth and browser routes read their bodies themselves (api/forms.py, api/browser.py), so
FastAPI cannot infer them; these tables are what the decorators attach as `openapi_extra=` and
`responses=`, so that the served schema, the fuzzer and client generators see the real contract.
"""

from __future__ import annotations

from typing import Any

from api.http.forms import FORM_TYPE, MAX_FIELD_CHARS
from api.http.openapi_links import (
    ISSUED_BEARER,
    SESSIONS_LINKS,
    TOKEN_LINKS,
    bearer_links,
    next_page,
)

Schema = dict[str, Any]

_STRING: Schema = {"type": "string", "maxLength": MAX_FIELD_CHARS}
_NON_EMPTY: Schema = {**_STRING, "minLength": 1}
_TIME: Schema = {"type": "string", "format": "date-time"}
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}

ERROR: Schema = {
    "type": "object",
    "description": "RFC 6749 §5.2 / RFC 6750 §3 error",
    "required": ["error", "error_description"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}
_NO_STORE_HEADERS: Schema = {
    "Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}},
    "Pragma": {"schema": {"type": "string", "enum": ["no-cache"]}},
}
_CHALLENGE: Schema = {
    "WWW-Authenticate": {"required": True, "schema": {"type": "string"}},
    **_NO_STORE_HEADERS,
}


def _error(description: str, headers: Schema = _NO_STORE_HEADERS) -> Schema:
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": ERROR}},
    }


def _json(description: str, schema: Schema, links: Schema | None = None) -> Schema:
    response = {
        "description": description,
        "headers": _NO_STORE_HEADERS,
        "content": {"application/json": {"schema": schema}},
    }
    return {**response, "links": links} if links else response


def _object(properties: Schema, required: list[str] | None = None) -> Schema:
    return {"type": "object", "properties": properties, "required": required or []}


_BAD_REQUEST = _error("invalid_request, invalid_grant, invalid_scope, unsupported_grant_type, …")
_RETRY_AFTER: Schema = {
    "Retry-After": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    **_NO_STORE_HEADERS,
}
_UNAVAILABLE = _error("temporarily_unavailable: the database cannot be reached", _RETRY_AFTER)
_SLOW_DOWN = _error("slow_down: too many login attempts from this address", _RETRY_AFTER)
# FastAPI would document a 422 for routes with parameters; the app answers 400 instead.
_OTHER = _error("any other client error")

OAUTH_ERRORS: dict[int | str, Schema] = {
    400: _BAD_REQUEST,
    401: _error("invalid_client, with a WWW-Authenticate challenge", _CHALLENGE),
    503: _UNAVAILABLE,
    "4XX": _OTHER,
}
BEARER_ERRORS: dict[int | str, Schema] = {
    400: _BAD_REQUEST,
    401: _error('RFC 6750: WWW-Authenticate: Bearer error="…"', _CHALLENGE),
    503: _UNAVAILABLE,
    "4XX": _OTHER,
}
AUDIT_ERRORS: dict[int | str, Schema] = {
    **BEARER_ERRORS,
    403: _error("insufficient_scope: the audit scope is required", _CHALLENGE),
    404: _error("not_found: no such session"),
}
SESSION_ERRORS: dict[int | str, Schema] = {**BEARER_ERRORS, 404: _error("not_found")}
BROWSER_ERRORS: dict[int | str, Schema] = {
    400: _BAD_REQUEST,
    403: _error("invalid_request: Origin not allowed or X-Requested-With missing"),
    503: _UNAVAILABLE,
    "4XX": _OTHER,
}

# -- request bodies -------------------------------------------------------------------------------

_CLIENT_FIELDS: Schema = {
    "client_id": {**_NON_EMPTY, "description": "public clients; or with client_secret"},
    "client_secret": {**_STRING, "description": "client_secret_post (or use HTTP Basic)"},
}
_TOKEN_FIELDS: Schema = {
    "grant_type": {
        "type": "string",
        "enum": ["authorization_code", "refresh_token", "password", "client_credentials"],
    },
    "code": {**_NON_EMPTY, "description": "grant_type=authorization_code"},
    "redirect_uri": {**_NON_EMPTY, "description": "grant_type=authorization_code"},
    "code_verifier": {**_NON_EMPTY, "description": "grant_type=authorization_code (PKCE)"},
    "username": {**_NON_EMPTY, "description": "grant_type=password"},
    "password": {**_NON_EMPTY, "description": "grant_type=password"},
    "scope": {**_STRING, "description": "grant_type=password; space-separated"},
    "refresh_token": {**_NON_EMPTY, "description": "grant_type=refresh_token"},
    **_CLIENT_FIELDS,
}
_TOKEN_HINT: Schema = {"type": "string", "enum": ["access_token", "refresh_token"]}
_REVOKE_FIELDS: Schema = {"token": _NON_EMPTY, "token_type_hint": _TOKEN_HINT, **_CLIENT_FIELDS}


def _form(properties: Schema, required: list[str]) -> Schema:
    schema = {**_object(properties, required), "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {FORM_TYPE: {"schema": schema}}}}


def _browser_body(properties: Schema, required: list[str]) -> Schema:
    schema = {**_object(properties, required), "additionalProperties": False}
    body = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
    origin = {"name": "Origin", "in": "header", "required": True, "schema": {"type": "string"}}
    requested = {"name": "X-Requested-With", "in": "header", "required": True, "schema": _NON_EMPTY}
    return {**body, "parameters": [origin, requested, _DPOP_PROOF]}


_DPOP_PROOF = {
    "name": "DPoP",
    "in": "header",
    "required": False,
    "description": "A DPoP proof (RFC 9449 §4): binds the session to its key, or proves it",
    "schema": {"type": "string"},
}
TOKEN_REQUEST = {**_form(_TOKEN_FIELDS, ["grant_type"]), "parameters": [_DPOP_PROOF]}
REVOKE_REQUEST = {**_form(_REVOKE_FIELDS, ["token"]), "parameters": [_DPOP_PROOF]}
INTROSPECT_REQUEST = _form(_REVOKE_FIELDS, ["token"])
BROWSER_LOGIN_REQUEST = _browser_body(
    {"client_id": _NON_EMPTY, "username": _NON_EMPTY, "password": _NON_EMPTY, "scope": _NON_EMPTY},
    ["client_id", "username", "password"],
)
BROWSER_CLIENT_REQUEST = _browser_body({"client_id": _NON_EMPTY}, ["client_id"])
_CODE_FIELDS = ("client_id", "code", "redirect_uri", "code_verifier")
BROWSER_CODE_REQUEST = _browser_body(
    {name: _NON_EMPTY for name in _CODE_FIELDS}, list(_CODE_FIELDS)
)
BEARER = {
    "parameters": [
        {
            "name": "Authorization",
            "in": "header",
            "required": True,
            "description": "Bearer <access token> (RFC 6750 §2.1), or DPoP <bound access token>"
            " with a DPoP proof header (RFC 9449 §7.1)",
            "schema": {"type": "string", "pattern": "^(Bearer|DPoP) [A-Za-z0-9._~+/-]+=*$"},
        }
    ]
}

FEED_READER = {
    "parameters": [
        {
            "name": "Authorization",
            "in": "header",
            "required": True,
            "description": "Bearer <access token holding sessions:read> (RFC 6750 §2.1), or"
            " Basic <a confidential client holding the client scope sessions:read>",
            "schema": {"type": "string", "pattern": "^(Bearer|Basic) [A-Za-z0-9._~+/-]+=*$"},
        }
    ]
}

# -- response bodies ------------------------------------------------------------------------------

_TOKEN_BODY = {
    "access_token": {"type": "string"},
    "token_type": {"type": "string", "enum": ["Bearer", "DPoP"]},
    "expires_in": {"type": "integer"},
    "scope": {"type": "string"},
}
TOKEN_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "RFC 6749 §5.1 token response",
        _object(
            {**_TOKEN_BODY, "refresh_token": {"type": "string"}},
            ["access_token", "token_type", "expires_in", "refresh_token", "scope"],
        ),
        TOKEN_LINKS,
    ),
    **OAUTH_ERRORS,
    429: _SLOW_DOWN,
}
REVOKE_RESPONSES: dict[int | str, Schema] = {
    200: {"description": "revoked, or the token was unknown (RFC 7009 §2.2)"},
    **OAUTH_ERRORS,
}
_CLAIMS = ("sub", "sid", "client_id", "scope", "iss", "aud")
INTROSPECT_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "RFC 7662 §2.2; only `active: false` when the token is not active",
        _object(
            {
                "active": {"type": "boolean"},
                "token_type": {
                    "type": "string",
                    "enum": ["access_token", "refresh_token", "DPoP"],
                },
                "exp": {"type": "integer"},
                "iat": {"type": "integer"},
                **{claim: {"type": "string"} for claim in _CLAIMS},
                "cnf": _object({"jkt": {"type": "string"}}, ["jkt"]),  # RFC 9449 §6.2
            },
            ["active"],
        ),
    ),
    **OAUTH_ERRORS,
}
BROWSER_TOKEN_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "the access token; the refresh token is in the HttpOnly cookie",
        _object(
            {**_TOKEN_BODY, "idle_timeout": {"type": "integer"}},
            ["access_token", "token_type", "expires_in", "scope", "idle_timeout"],
        ),
        bearer_links(ISSUED_BEARER),
    ),
    **BROWSER_ERRORS,
    429: _SLOW_DOWN,
}
BROWSER_LOGOUT_RESPONSES: dict[int | str, Schema] = {
    204: {"description": "logged out; the refresh cookie is cleared"},
    **BROWSER_ERRORS,
}
_SESSION = _object(
    {
        "id": {"type": "string"},
        "client_id": {"type": "string"},
        "started_at": _TIME,
        "last_activity": _TIME,
        "idle_expires_at": _TIME,
        "absolute_expires_at": _TIME,
        "ip": _NULLABLE_STRING,
        "user_agent": _NULLABLE_STRING,
        "current": {"type": "boolean"},
    },
    ["id", "client_id", "started_at", "last_activity", "current"],
)
SESSIONS_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "the caller's active sessions",
        _object({"sessions": {"type": "array", "items": _SESSION}}, ["sessions"]),
        SESSIONS_LINKS,
    ),
    **BEARER_ERRORS,
}
NO_CONTENT_RESPONSES: dict[int | str, Schema] = {204: {"description": "done"}, **BEARER_ERRORS}
END_SESSION_RESPONSES: dict[int | str, Schema] = {204: {"description": "ended"}, **SESSION_ERRORS}

_EVENT = _object(
    {
        "position": {"type": "integer"},
        "stream_id": {"type": "string"},
        "version": {"type": "integer"},
        "type": {"type": "string"},
        "schema_version": {"type": "integer"},
        "occurred_at": _TIME,
        "recorded_at": _TIME,
        "data": {"type": "object"},
        "metadata": {"type": "object"},
    },
    ["position", "stream_id", "version", "type", "occurred_at", "data", "metadata"],
)
_POINT_IN_TIME = _object(
    {
        "session_id": {"type": "string"},
        "as_of": _TIME,
        "status": {"type": "string"},
        "valid": {"type": "boolean"},
        "end_reason": _NULLABLE_STRING,
        "user": {"type": "string"},
        "client_id": {"type": "string"},
        "generation": {"type": "integer"},
        "idle_seconds": {"type": "integer"},
        "expires_at": _TIME,
        "ended_at": {"type": ["string", "null"]},
    },
    ["session_id", "as_of", "status", "valid"],
)
_EVENTS = {"events": {"type": "array", "items": _EVENT}}
AUDIT_EVENTS_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "up to `limit` events in version order; `next` is the `after` of the following page",
        _object({**_EVENTS, "next": {"type": "integer"}}, ["events", "next"]),
        next_page("/audit/sessions/{session_id}/events", ("session_id",), ("limit",)),
    ),
    **AUDIT_ERRORS,
}
AUDIT_PAGE_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "one page; `next` is the cursor for the following page",
        _object({**_EVENTS, "next": {"type": "string"}}, ["events", "next"]),
        next_page("/audit/events", (), ("limit", "type", "user", "from", "to")),
    ),
    **AUDIT_ERRORS,
}
AUDIT_SESSION_RESPONSES: dict[int | str, Schema] = {
    200: _json("the session as it was at as_of", _POINT_IN_TIME),
    **AUDIT_ERRORS,
}
AUDIT_USER_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "the user's sessions and their status now",
        _object({"sessions": {"type": "array", "items": _POINT_IN_TIME}}, ["sessions"]),
    ),
    **AUDIT_ERRORS,
}
AUDIT_ALERTS_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "security alerts after the cursor",
        _object(
            {"alerts": {"type": "array", "items": {"type": "object"}}, "next": {"type": "integer"}},
            ["alerts", "next"],
        ),
    ),
    **AUDIT_ERRORS,
}
_SESSION_END: Schema = _object(
    {
        "cursor": {"type": "string"},
        "sid": {"type": "string"},
        "sub": {"type": "string"},
        "client_id": {"type": "string"},
        "reason": {"type": "string"},
        "ended_at": _TIME,
    },
    ["cursor", "sid", "sub", "client_id", "reason", "ended_at"],
)
_FEED_PAGE: Schema = _object(
    {"events": {"type": "array", "items": _SESSION_END}, "next": {"type": "string"}},
    ["events", "next"],
)
FEED_RESPONSES: dict[int | str, Schema] = {
    200: {
        "description": "a page of session ends (`next`: the cursor of the following page), or with"
        " Accept: text/event-stream a stream of them",
        "headers": _NO_STORE_HEADERS,
        "content": {
            "application/json": {"schema": _FEED_PAGE},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
    400: _BAD_REQUEST,
    401: _error("invalid_token or invalid_client, with a WWW-Authenticate challenge", _CHALLENGE),
    403: _error("insufficient_scope: sessions:read is required", _CHALLENGE),
    503: _UNAVAILABLE,
    "4XX": _OTHER,
}
METRICS_RESPONSES: dict[int | str, Schema] = {
    200: {
        "description": "Prometheus text",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    503: _UNAVAILABLE,
}
_HEALTH = _object(
    {"status": {"type": "string", "enum": ["ok", "unavailable"]}, "database": {"type": "boolean"}},
    ["status", "database"],
)
HEALTH_RESPONSES: dict[int | str, Schema] = {
    200: _json("PostgreSQL answers", _HEALTH),
    503: _json("PostgreSQL does not answer", _HEALTH),
}
METADATA_RESPONSES: dict[int | str, Schema] = {
    200: {
        "description": "RFC 8414 authorization server metadata",
        "content": {
            "application/json": {"schema": _object({"issuer": {"type": "string"}}, ["issuer"])}
        },
    },
}
_JWK = _object({"kty": {"type": "string"}, "kid": {"type": "string"}}, ["kty", "kid"])
JWKS_RESPONSES: dict[int | str, Schema] = {
    200: {
        "description": "RFC 7517 JWK set of the signing keys",
        "content": {
            "application/json": {
                "schema": _object({"keys": {"type": "array", "items": _JWK}}, ["keys"])
            }
        },
    },
    503: _UNAVAILABLE,
}

# -- Shared Signals (api/http/signals.py) ---------------------------------------------------------

_SSF_ERRORS: dict[int | str, Schema] = {
    **BEARER_ERRORS,
    403: _error(
        "insufficient_scope: a receiver's client_credentials token holding ssf.manage"
        " (or, to read and poll, ssf.read) is required",
        _CHALLENGE,
    ),
    404: _error("not_found: the receiver has no such stream"),
}
_SSF_DELIVERY: Schema = _object(
    {
        "method": {"type": "string", "enum": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"]},
        "endpoint_url": {**_NON_EMPTY, "description": "push: the receiver's (https)"},
        "authorization_header": {**_NON_EMPTY, "description": "push: sent with every SET"},
    },
    ["method"],
)
_URIS: Schema = {"type": "array", "items": {"type": "string"}}
_SSF_STREAM: Schema = _object(
    {
        "stream_id": {"type": "string"},
        "iss": {"type": "string"},
        "aud": {"type": "string"},
        "delivery": _SSF_DELIVERY,
        "events_supported": _URIS,
        "events_delivered": _URIS,
        "description": {"type": "string"},
    },
    ["stream_id", "iss", "aud", "delivery", "events_delivered"],
)
_SSF_STATUS: Schema = _object(
    {
        "stream_id": {"type": "string"},
        "status": {"type": "string", "enum": ["enabled", "paused", "disabled"]},
        "reason": {"type": "string"},
    },
    ["stream_id", "status"],
)


def _json_body(properties: Schema, required: list[str]) -> Schema:
    schema = _object(properties, required)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


SSF_CREATE_REQUEST = _json_body(
    {"delivery": _SSF_DELIVERY, "events_requested": _URIS, "description": _NON_EMPTY}, []
)
SSF_STATUS_REQUEST = _json_body(
    {
        "stream_id": _NON_EMPTY,
        "status": _SSF_STATUS["properties"]["status"],
        "reason": _NON_EMPTY,
    },
    ["stream_id", "status"],
)
SSF_VERIFY_REQUEST = _json_body({"stream_id": _NON_EMPTY, "state": _NON_EMPTY}, ["stream_id"])
SSF_POLL_REQUEST = _json_body(
    {
        "maxEvents": {"type": "integer", "minimum": 0},
        "returnImmediately": {"type": "boolean"},
        "ack": {"type": "array", "items": {"type": "string"}},
        "setErrs": {
            "type": "object",
            "additionalProperties": _object(
                {"err": _NON_EMPTY, "description": _NON_EMPTY}, ["err"]
            ),
        },
    },
    [],
)
SSF_CONFIGURATION_RESPONSES: dict[int | str, Schema] = {
    200: {
        "description": "Shared Signals (SSF 1.0 §7) transmitter configuration metadata",
        "content": {
            "application/json": {"schema": _object({"issuer": {"type": "string"}}, ["issuer"])}
        },
    },
}
SSF_CREATE_RESPONSES: dict[int | str, Schema] = {
    201: _json("the new stream's configuration", _SSF_STREAM),
    **_SSF_ERRORS,
}
SSF_READ_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "with stream_id, that stream's configuration; without, a list of the receiver's",
        {"oneOf": [_SSF_STREAM, {"type": "array", "items": _SSF_STREAM}]},
    ),
    **_SSF_ERRORS,
}
SSF_STATUS_RESPONSES: dict[int | str, Schema] = {
    200: _json("the stream's status", _SSF_STATUS),
    **_SSF_ERRORS,
}
SSF_EMPTY_RESPONSES: dict[int | str, Schema] = {
    204: {"description": "done", "headers": _NO_STORE_HEADERS},
    **_SSF_ERRORS,
}
SSF_POLL_RESPONSES: dict[int | str, Schema] = {
    200: _json(
        "RFC 8936 §2.3: the unacknowledged SETs by jti, and whether more are available",
        _object(
            {
                "sets": {"type": "object", "additionalProperties": {"type": "string"}},
                "moreAvailable": {"type": "boolean"},
            },
            ["sets"],
        ),
    ),
    **_SSF_ERRORS,
}
