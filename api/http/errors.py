"""Errors at the HTTP edge: RFC 6749 §5.2 for the OAuth endpoints, RFC 6750 §3 for bearer calls.

This module is the only place that knows the RFC error codes and their status codes.
"""

from __future__ import annotations

import math
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ledger.errors import DatabaseUnavailable

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An RFC 6749 error response from the token, revocation or introspection endpoint."""

    status = 400
    error = "invalid_request"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def headers(self) -> dict[str, str]:
        return dict(NO_STORE)


class InvalidRequest(OAuthError):
    """A parameter is missing, repeated, malformed or too large."""


class InvalidGrant(OAuthError):
    """Bad credentials, or a refresh token that is unknown, rotated, expired or revoked."""

    error = "invalid_grant"


class UnsupportedGrantType(OAuthError):
    """The grant_type is not one this server knows."""

    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    """The requested scope is unknown or beyond what the user holds."""

    error = "invalid_scope"


class UnauthorizedClient(OAuthError):
    """The client may not use this grant type."""

    error = "unauthorized_client"


class InvalidClient(OAuthError):
    """Client authentication failed (RFC 6749: 401 with a WWW-Authenticate challenge)."""

    status = 401
    error = "invalid_client"

    def headers(self) -> dict[str, str]:
        return {**NO_STORE, "WWW-Authenticate": 'Basic realm="session-ledger"'}


class SlowDown(OAuthError):
    """Too many attempts from one address: 429 with Retry-After (the `slow_down` code RFC 8628
    registers for token endpoint responses)."""

    status = 429
    error = "slow_down"

    def __init__(self, description: str, retry_after: timedelta) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {**NO_STORE, "Retry-After": str(max(1, math.ceil(self.retry_after.total_seconds())))}


class BearerError(Exception):
    """A bearer-authenticated call without a usable access token (RFC 6750 §3.1)."""

    def __init__(self, description: str, *, status: int = 401, error: str = "invalid_token"):
        super().__init__(description)
        self.description = description
        self.status = status
        self.error = error


class NotFound(Exception):
    """The resource does not exist or is not the caller's."""


def install(app: FastAPI) -> None:
    """Register the handlers that turn these errors into RFC-shaped responses, and refuse
    oversized request targets and headers and NUL characters in paths and query strings
    (PostgreSQL text cannot hold them)."""

    app.add_middleware(_RequestGuard)
    app.add_exception_handler(OAuthError, _oauth_error)  # type: ignore[arg-type]
    app.add_exception_handler(BearerError, _bearer_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DatabaseUnavailable, _unavailable)


def oauth_error_body(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


MAX_TARGET_BYTES = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64


class _RequestGuard:
    """Refuses, before any route sees it, a request whose path and query exceed
    MAX_TARGET_BYTES (414), whose headers exceed MAX_HEADERS or MAX_HEADER_BYTES in all (431), or
    whose path or query holds NUL (400). Plain ASGI: other requests pay a few sums and scans."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self._app(scope, receive, send)
            return
        status, description = refusal
        body = oauth_error_body("invalid_request", description)
        await JSONResponse(body, status_code=status, headers=NO_STORE)(scope, receive, send)


def _refusal(scope: Scope) -> tuple[int, str] | None:
    path, query = scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b"")
    if len(path) + len(query) > MAX_TARGET_BYTES:
        return 414, f"the request target exceeds {MAX_TARGET_BYTES} bytes"
    headers = scope["headers"]
    if len(headers) > MAX_HEADERS:
        return 431, f"more than {MAX_HEADERS} request headers"
    if sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
        return 431, f"the request headers exceed {MAX_HEADER_BYTES} bytes"
    lowered = query.lower()
    if "\x00" in scope["path"] or b"%00" in lowered or b"\x00" in lowered:
        return 400, "NUL characters are not allowed"
    return None


def oauth_error_response(exc: OAuthError) -> JSONResponse:
    body = oauth_error_body(exc.error, exc.description)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


async def _oauth_error(request: Request, exc: OAuthError) -> JSONResponse:
    return oauth_error_response(exc)


async def _bearer_error(request: Request, exc: BearerError) -> JSONResponse:
    challenge = f'Bearer realm="session-ledger", error="{exc.error}"'
    if exc.status == 401 and exc.error == "invalid_token":
        challenge += f', error_description="{exc.description}"'
    headers = {**NO_STORE, "WWW-Authenticate": challenge}
    body = oauth_error_body(exc.error, exc.description)
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    body = oauth_error_body("not_found", "no such session")
    return JSONResponse(body, status_code=404, headers=NO_STORE)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    body = oauth_error_body("invalid_request", "malformed request parameters")
    return JSONResponse(body, status_code=400, headers=NO_STORE)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    body = oauth_error_body("temporarily_unavailable", "the database cannot be reached")
    return JSONResponse(body, status_code=503, headers={**NO_STORE, "Retry-After": "5"})
