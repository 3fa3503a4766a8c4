"""The audit API: session timelines, point-in-time state, users' sessions, events, alerts.

Every route needs an access token whose scope includes `audit` (403 `insufficient_scope`
otherwise, 401 without a valid token).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.cursors import MAX_BIGINT, decode_cursor, encode_cursor
from api.errors import InsufficientScope, InvalidRequest, NotFound
from api.http import openapi as oas
from api.http.dependencies import Caller, Service
from api.http.errors import NO_STORE
from ledger.db import translated_errors
from ledger.events import unknown_types
from ledger.records import START, RecordedEvent
from ledger.serialization import format_timestamp
from ledger.store import EventStore
from projections import session
from projections.replay import PointInTime, as_of, judge
from projections.sql.inline import user_sessions
from projections.streams import principal_stream_id, session_stream_id

router = APIRouter(prefix="/audit")
MAX_LIMIT = 1000
AUDIT_SCOPE = "audit"


async def _auditor(caller: Caller) -> str:
    claims, _ = caller
    if AUDIT_SCOPE not in claims.scope:
        raise InsufficientScope("the audit scope is required")
    return claims.subject


Auditor = Annotated[str, Depends(_auditor)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Version = Annotated[int, Query(ge=0, le=2**31 - 1)]
Position = Annotated[int, Query(ge=0, le=MAX_BIGINT)]
# Times far enough from datetime's and PostgreSQL's limits that a session's durations added to
# them stay representable.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
DATE_TIME: dict[str, Any] = {"format": "date-time"}  # ISO 8601 (RFC 3339 in the schema)


async def _store(request: Request) -> EventStore:  # async: no thread hop (dependencies.py)
    return EventStore(request.app.state.pool)


Store = Annotated[EventStore, Depends(_store)]


@router.get(
    "/sessions/{session_id}/events", openapi_extra=oas.BEARER, responses=oas.AUDIT_EVENTS_RESPONSES
)
async def session_events(
    session_id: str, auditor: Auditor, store: Store, after: Version = 0, limit: Limit = MAX_LIMIT
) -> JSONResponse:
    stream = session_stream_id(session_id)
    events = await run_in_threadpool(store.read_stream, stream, after + 1, limit)
    if not events and after == 0:
        raise NotFound("no such session")
    body = {
        "events": [event_body(e) for e in events],
        "next": events[-1].version if events else after,
    }
    return JSONResponse(body, headers=NO_STORE)


@router.get(
    "/sessions/{session_id}", openapi_extra=oas.BEARER, responses=oas.AUDIT_SESSION_RESPONSES
)
async def session_as_of(
    session_id: str,
    auditor: Auditor,
    store: Store,
    service: Service,
    as_of_time: Annotated[str | None, Query(alias="as_of", json_schema_extra=DATE_TIME)] = None,
) -> JSONResponse:
    moment = _time(as_of_time, "as_of") if as_of_time else service.clock()
    recorded = await run_in_threadpool(store.read_stream, session_stream_id(session_id))
    if not recorded:
        raise NotFound("no such session")
    view = as_of(session_id, [r.event for r in recorded], moment, service.policy)
    return JSONResponse(point_in_time_body(view, service.policy), headers=NO_STORE)


@router.get("/users/{name}/sessions", openapi_extra=oas.BEARER, responses=oas.AUDIT_USER_RESPONSES)
async def users_sessions(
    name: str, auditor: Auditor, request: Request, service: Service, limit: Limit = 100
) -> JSONResponse:
    states = await run_in_threadpool(_user_sessions, request, name, limit)
    now = service.clock()
    body = [point_in_time_body(judge(s, now, service.policy), service.policy) for s in states]
    return JSONResponse({"sessions": body}, headers=NO_STORE)


@router.get("/events", openapi_extra=oas.BEARER, responses=oas.AUDIT_PAGE_RESPONSES)
async def events(
    auditor: Auditor,
    request: Request,
    store: Store,
    after: str | None = None,
    limit: Limit = 100,
    type: Annotated[list[str] | None, Query()] = None,
    user: str | None = None,
    from_time: Annotated[str | None, Query(alias="from", json_schema_extra=DATE_TIME)] = None,
    to_time: Annotated[str | None, Query(alias="to", json_schema_extra=DATE_TIME)] = None,
) -> JSONResponse:
    cursor = decode_cursor(after) if after else START
    unknown = sorted(set(unknown_types(type or ())))
    if unknown:
        raise InvalidRequest(f"unknown event type(s): {', '.join(unknown)}")
    streams = await run_in_threadpool(_streams_of, request, user) if user else None
    page = await run_in_threadpool(
        lambda: store.read_filtered(
            cursor,
            limit,
            types=type,
            stream_ids=streams,
            occurred_from=_time(from_time, "from") if from_time else None,
            occurred_to=_time(to_time, "to") if to_time else None,
        )
    )
    next_cursor = encode_cursor(page[-1].checkpoint if page else cursor)
    body = {"events": [event_body(e) for e in page], "next": next_cursor}
    return JSONResponse(body, headers=NO_STORE)


@router.get("/alerts", openapi_extra=oas.BEARER, responses=oas.AUDIT_ALERTS_RESPONSES)
async def alerts(
    auditor: Auditor, request: Request, after: Position = 0, limit: Limit = 100
) -> JSONResponse:
    rows = await run_in_threadpool(_alerts, request, after, limit)
    # The cursor of the next page: the last alert's position (the same `after` when none came).
    body = {"alerts": rows, "next": rows[-1]["position"] if rows else after}
    return JSONResponse(body, headers=NO_STORE)


def event_body(event: RecordedEvent) -> dict[str, Any]:
    return {
        "position": event.position,
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "schema_version": event.schema_version,
        "occurred_at": format_timestamp(event.occurred_at),
        "recorded_at": format_timestamp(event.recorded_at),
        "data": event.data,
        "metadata": event.metadata,
    }


def point_in_time_body(view: PointInTime, policy: session.Policy) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_id": view.session_id,
        "as_of": format_timestamp(view.as_of),
        "status": view.status,
        "valid": view.is_valid,
    }
    state = view.state
    if state is None:
        return body
    ends, _ = session.expiry(state, policy)
    return {
        **body,
        "end_reason": state.end_reason,
        "user": state.user,
        "client_id": state.client_id,
        "generation": state.generation,
        "started_at": format_timestamp(state.started_at),
        "last_activity": format_timestamp(state.last_activity),
        "idle_seconds": int(view.idle_for.total_seconds()) if view.idle_for else 0,
        "expires_at": format_timestamp(ends),
        "ended_at": format_timestamp(state.ended_at) if state.ended_at else None,
        "ip": state.ip,
        "user_agent": state.user_agent,
    }


def _time(text: str, name: str) -> datetime:
    """An ISO 8601 time (UTC when it names no offset) between EARLIEST and LATEST."""
    try:
        moment = datetime.fromisoformat(text)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} is not an ISO 8601 time") from None
    if not EARLIEST <= moment < LATEST:
        raise InvalidRequest(f"{name} must lie between {EARLIEST.year} and {LATEST.year}")
    return moment


def _user_sessions(request: Request, name: str, limit: int) -> list[session.SessionState]:
    with translated_errors(), request.app.state.pool.connection() as conn:
        return user_sessions(conn, name, limit)


def _streams_of(request: Request, user: str) -> list[str]:
    with translated_errors(), request.app.state.pool.connection() as conn:
        rows = conn.execute("SELECT session_id FROM sessions WHERE user_name = %s", (user,))
        return [principal_stream_id(user), *(session_stream_id(r[0]) for r in rows)]


def _alerts(request: Request, after: int, limit: int) -> list[dict[str, Any]]:
    with translated_errors(), request.app.state.pool.connection() as conn:
        cursor = conn.execute(
            "SELECT position, kind, occurred_at, user_name, session_id, ip, details FROM alerts"
            " WHERE position > %s ORDER BY position LIMIT %s",
            (after, limit),
        )
        columns = [c.name for c in cursor.description or ()]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor]
    for row in rows:
        row["occurred_at"] = format_timestamp(row["occurred_at"])
    return rows
