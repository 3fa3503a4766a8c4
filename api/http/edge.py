"""The one ASGI layer in front of every route: it refuses a request head that no route may see,
gives every answer the headers no answer may lack, and measures every answer.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task per request; one layer
rather than one per concern, since each layer is a call and a closure on every request. The body
limit stays where a body is read (api.http.forms), since only the reader sees a streamed body's
size.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.errors import NO_STORE, error_body

MAX_TARGET_BYTES = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64

_REFUSAL_HEADERS = [
    (b"content-type", b"application/json"),
    *((name.lower().encode(), value.encode()) for name, value in NO_STORE.items()),
]
# Metric labels come from closed sets: any other method is "other" (a raw request may send any
# token as its method, and each new label value would be a new series kept for good).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_NO_STORE = (b"cache-control", b"no-store")
# Credentials in a URL end up in logs, browser history and Referer headers: refused (RFC 6750
# §2.3 lets a server refuse access_token in the query; the others never belong there).
_CREDENTIAL_PARAMETERS = frozenset(
    {b"access_token", b"refresh_token", b"client_secret", b"password", b"token", b"code"}
)

# The demo page is where the login page sends its users back, with the code in the query as
# RFC 6749 §4.1.2 says; the page takes it out of the address bar at once.
DEMO_PATH = "/demo"
_CODE_RETURN = _CREDENTIAL_PARAMETERS - {b"code"}


def install(app: FastAPI, latency: Histogram) -> None:
    app.add_middleware(Edge, latency=latency)


class Edge:
    """Refuses, before any route sees it, a request whose path and query exceed
    MAX_TARGET_BYTES (414), whose headers exceed MAX_HEADERS or MAX_HEADER_BYTES in all (431), or
    whose path or query holds NUL (400; PostgreSQL text cannot hold it) or a credential (400).
    Adds `X-Content-Type-Options: nosniff` to every answer and `Cache-Control: no-store` to every
    one that sets no Cache-Control of its own (the framework's 404 and 405 among them). Records
    every answer's latency by route template (ids make no new series), method and status class.
    """

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self._app = app
        self._latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": _completed(message.get("headers", []))}
            await send(message)

        try:
            refusal = _refusal(scope)
            if refusal is None:
                await self._app(scope, receive, send_noting_status)
            else:
                await _refuse(send_noting_status, *refusal)
        finally:
            # Starlette's router records the route it chose in the scope: its template.
            route = str(getattr(scope.get("route"), "path", "unmatched"))
            method = scope["method"] if scope["method"] in _METHODS else "other"
            series = self._latency.labels(route, method, f"{status // 100}xx")
            series.observe(time.perf_counter() - started)


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
    refused = _CODE_RETURN if scope["path"] == DEMO_PATH else _CREDENTIAL_PARAMETERS
    if lowered and any(name.partition(b"=")[0] in refused for name in lowered.split(b"&")):
        return 400, "credentials are not accepted in the query string; send them in the body"
    return None


def _completed(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    names = {name.lower() for name, _ in headers}
    added = [_NOSNIFF] if _NOSNIFF[0] not in names else []
    if _NO_STORE[0] not in names:
        added.append(_NO_STORE)
    return [*headers, *added] if added else headers


async def _refuse(send: Send, status: int, description: str) -> None:
    body = json.dumps(error_body("invalid_request", description)).encode()
    headers = [*_REFUSAL_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
