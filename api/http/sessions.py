"""The caller's own sessions, by bearer token: activity, listing and ending them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.errors import NotFound
from api.http import openapi as oas
from api.http.dependencies import Caller, Info, Service
from api.http.errors import NO_STORE
from ledger.serialization import format_timestamp
from projections import session
from projections.session import SessionState

router = APIRouter()


@router.post(
    "/sessions/current/activity",
    status_code=204,
    openapi_extra=oas.BEARER,
    responses=oas.NO_CONTENT_RESPONSES,
)
async def activity(caller: Caller, service: Service, info: Info) -> Response:
    await service.record_activity(caller[1], info)
    return Response(status_code=204, headers=NO_STORE)


@router.get("/sessions", openapi_extra=oas.BEARER, responses=oas.SESSIONS_RESPONSES)
async def sessions(caller: Caller, service: Service) -> JSONResponse:
    claims, current = caller
    states = await run_in_threadpool(service.list_sessions, claims.subject)
    policy = service.policy
    body = [_session_body(s, current.session_id, policy) for s in states]
    return JSONResponse({"sessions": body}, headers=NO_STORE)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    openapi_extra=oas.BEARER,
    responses=oas.END_SESSION_RESPONSES,
)
async def end_session(session_id: str, caller: Caller, service: Service, info: Info) -> Response:
    claims, _ = caller
    if not await run_in_threadpool(service.end_session, claims.subject, session_id, info):
        raise NotFound("no such session")
    return Response(status_code=204, headers=NO_STORE)


@router.delete(
    "/sessions", status_code=204, openapi_extra=oas.BEARER, responses=oas.NO_CONTENT_RESPONSES
)
async def end_all_sessions(caller: Caller, service: Service, info: Info) -> Response:
    claims, _ = caller
    await run_in_threadpool(service.end_all, claims.subject, info)
    return Response(status_code=204, headers=NO_STORE)


def _session_body(state: SessionState, current: str, policy: session.Policy) -> dict[str, Any]:
    return {
        "id": state.session_id,
        "client_id": state.client_id,
        "started_at": format_timestamp(state.started_at),
        "last_activity": format_timestamp(state.last_activity),
        "idle_expires_at": format_timestamp(session.idle_end_of(state, policy)),
        "absolute_expires_at": format_timestamp(session.absolute_end_of(state, policy)),
        "ip": state.ip,
        "user_agent": state.user_agent,
        "current": state.session_id == current,
    }
