"""The guard in an ASGI application: a middleware for every route (plain ASGI, no framework
needed), or a FastAPI dependency for some (imports FastAPI when it is made)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from session_ledger_guard._guard import Guard, Refused

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GuardMiddleware:
    """Refuses every HTTP request without a valid access token of a live session (RFC 6750
    answers; a DPoP-bound token needs `Authorization: DPoP` and its proof, RFC 9449), and puts
    the token's claims in `scope["state"]["claims"]` (Starlette's `request.state.claims`).
    Paths in `exempt` (a health check, say) pass untouched."""

    def __init__(
        self, app: ASGIApp, *, guard: Guard, scope: str | None = None, exempt: Iterable[str] = ()
    ) -> None:
        self.app, self.guard, self.scope, self.exempt = app, guard, scope, frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            claims = self.guard.verify_request(
                headers.get("authorization"),
                method=scope["method"],
                url=_request_url(scope, headers),
                dpop=headers.get("dpop"),
                scope=self.scope,
            )
        except Refused as refused:
            await _refuse(send, refused)
            return
        scope.setdefault("state", {})["claims"] = claims
        await self.app(scope, receive, send)


def claims_dependency(guard: Guard, scope: str | None = None) -> Callable[..., dict[str, Any]]:
    """A FastAPI dependency returning the verified claims, or answering as RFC 6750 says:
    `claims: Annotated[dict, Depends(claims_dependency(guard))]`."""
    from fastapi import HTTPException, Request

    def claims(request: Request) -> dict[str, Any]:
        try:
            return guard.verify_request(
                request.headers.get("authorization"),
                method=request.method,
                url=str(request.url),
                dpop=request.headers.get("dpop"),
                scope=scope,
            )
        except Refused as refused:
            raise HTTPException(
                refused.status_code, detail=refused.body(), headers=refused.headers()
            ) from None

    # FastAPI reads the annotation to inject the request: the class, not this module's string.
    claims.__annotations__ = {"request": Request, "return": dict[str, Any]}
    return claims


def _request_url(scope: Scope, headers: dict[str, str]) -> str:
    """The URL the client sent the request to, as a DPoP proof's `htu` names it: the scheme and
    Host the server saw (behind a proxy, run uvicorn with --proxy-headers), then the path."""
    host = headers.get("host") or "{}:{}".format(*(scope.get("server") or ("localhost", 80)))
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{scope['path']}"


async def _refuse(send: Send, refused: Refused) -> None:
    body = json.dumps(refused.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refused.headers().items()]
    await send({"type": "http.response.start", "status": refused.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
