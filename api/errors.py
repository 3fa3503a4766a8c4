"""Errors at the HTTP edge: RFC 6749 §5.2 for the OAuth endpoints, RFC 6750 §3 for bearer calls.

This module is the only place that knows the RFC error codes and their status codes.
"""

from __future__ import annotations

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
    """Register the handlers that turn these errors into RFC-shaped responses, and refuse NUL
    characters in paths and query strings (PostgreSQL text cannot hold them)."""

    app.add_middleware(_RefuseNul)
    app.add_exception_handler(OAuthError, _oauth_error)  # type: ignore[arg-type]
    app.add_exception_handler(BearerError, _bearer_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DatabaseUnavailable, _unavailable)


def oauth_error_body(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


class _RefuseNul:
    """Answers 400 to a path or query string holding NUL, before any route sees it (plain ASGI,
    so every other request pays one scan of its path and query and nothing more)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope.get("query_string", b"").lower()
            if "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query:
                body = oauth_error_body("invalid_request", "NUL characters are not allowed")
                await JSONResponse(body, status_code=400, headers=NO_STORE)(scope, receive, send)
                return
        await self._app(scope, receive, send)


async def _oauth_error(request: Request, exc: OAuthError) -> JSONResponse:
    body = oauth_error_body(exc.error, exc.description)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


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
