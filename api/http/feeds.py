"""GET /feeds/session-ends: every session end, for resource servers (api.feed).

`Accept: text/event-stream` gets a stream of server-sent events, one per ended session, whose `id`
is the cursor to resume from (`Last-Event-ID` or `?after=`), with a comment line as a heartbeat at
least every LEDGER_FEED_HEARTBEAT (15 s); anything else gets JSON pages,
`{"events": [...], "next": cursor}`.

The reader presents an access token holding the scope `sessions:read` (a resource server's own,
from the client_credentials grant), or authenticates as a confidential client holding that client
scope by HTTP Basic.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from api.accounts import SESSIONS_READ_SCOPE
from api.cursors import decode_cursor, encode_cursor
from api.errors import InsufficientScope, InvalidClient
from api.feed import SessionEnd, SessionEndHub, read_ends, start_of_feed
from api.http import openapi as oas
from api.http.dependencies import Info, Service, authenticated_client
from api.http.errors import NO_STORE, BearerRequired
from api.http.proofs import access_token
from ledger.records import Checkpoint
from ledger.store import EventStore

router = APIRouter()
MAX_LIMIT = 1000
_NEEDS_SCOPE = f"the {SESSIONS_READ_SCOPE} scope is required"


@router.get(
    "/feeds/session-ends",
    response_model=None,
    openapi_extra=oas.FEED_READER,
    responses=oas.FEED_RESPONSES,
)
async def session_ends(
    request: Request,
    service: Service,
    info: Info,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> JSONResponse | StreamingResponse:
    await _check_reader(request, service, info)
    store = EventStore(request.app.state.pool)
    resume = after if after is not None else request.headers.get("last-event-id")
    if resume:
        cursor = decode_cursor(resume)
    else:
        lookback = service.policy.access_token_ttl
        cursor = await run_in_threadpool(start_of_feed, store, lookback)
    if "text/event-stream" in request.headers.get("accept", ""):
        hub: SessionEndHub = request.app.state.session_ends
        heartbeat = request.app.state.settings.feed_heartbeat.total_seconds()
        return StreamingResponse(
            _events(hub, cursor, heartbeat),
            media_type="text/event-stream",
            headers={**NO_STORE, "X-Accel-Buffering": "no"},
        )
    page = await run_in_threadpool(read_ends, store, cursor, limit)
    body = {
        "events": [{"cursor": end.cursor, **end.body()} for end in page],
        "next": page[-1].cursor if page else encode_cursor(cursor),
    }
    return JSONResponse(body, headers=NO_STORE)


async def _check_reader(request: Request, service: Service, info: Info) -> None:
    """Nothing when the reader may follow the feed; else the RFC 6750 refusal."""
    presented = await access_token(request)
    if presented is not None:
        claims, _ = await service.verify_bearer(*presented)
        if SESSIONS_READ_SCOPE not in claims.scope:
            raise InsufficientScope(_NEEDS_SCOPE)
        return
    if request.headers.get("authorization", "")[:6].lower() == "basic ":
        client = await authenticated_client(request, {}, info)
        if not client.is_confidential:
            raise InvalidClient("the feed needs a confidential client")
        if SESSIONS_READ_SCOPE not in client.scopes:
            raise InsufficientScope(_NEEDS_SCOPE)
        return
    raise BearerRequired(f"a bearer access token with the {SESSIONS_READ_SCOPE} scope is required")


async def _events(hub: SessionEndHub, after: Checkpoint, heartbeat: float) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"  # EventSource reconnects after a second, with Last-Event-ID
    while not hub.closed:
        ends = await hub.ends_after(after, heartbeat)
        if not ends:
            yield ": heartbeat\n\n"
            continue
        yield "".join(_event(end) for end in ends)
        after = ends[-1].checkpoint


def _event(end: SessionEnd) -> str:
    data = json.dumps(end.body(), separators=(",", ":"))
    return f"id: {end.cursor}\ndata: {data}\n\n"
