"""The one ASGI layer in front of every route: it refuses a request head that no route may see,
and measures every answer.

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


def install(app: FastAPI, latency: Histogram) -> None:
    app.add_middleware(Edge, latency=latency)


class Edge:
    """Refuses, before any route sees it, a request whose path and query exceed
    MAX_TARGET_BYTES (414), whose headers exceed MAX_HEADERS or MAX_HEADER_BYTES in all (431), or
    whose path or query holds NUL (400; PostgreSQL text cannot hold it). Records every answer's
    latency by route template (ids make no new series), method and status class."""

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
            series = self._latency.labels(route, scope["method"], f"{status // 100}xx")
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
    return None


async def _refuse(send: Send, status: int, description: str) -> None:
    body = json.dumps(error_body("invalid_request", description)).encode()
    headers = [*_REFUSAL_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
