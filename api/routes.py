from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api import openapi as oas
from api.accounts import GRANTS, Accounts, Client
from api.errors import (
    NO_STORE,
    BearerError,
    InvalidClient,
    InvalidRequest,
    NotFound,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from api.forms import client_credentials, read_form, required
from api.sessions import RequestInfo, SessionService, TokenGrant
from api.tokens import AccessClaims, InvalidToken
from ledger.serialization import format_timestamp
from projections import session
from projections.session import SessionState

router = APIRouter()


def _service(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _info(request: Request) -> RequestInfo:
    ip = request.client.host if request.client else None
    return RequestInfo(str(uuid.uuid4()), ip, request.headers.get("user-agent"))


Service = Annotated[SessionService, Depends(_service)]
Info = Annotated[RequestInfo, Depends(_info)]


@router.post("/oauth/token", openapi_extra=oas.TOKEN_REQUEST, responses=oas.TOKEN_RESPONSES)
async def token(request: Request, service: Service, info: Info) -> JSONResponse:
    form = await read_form(request)
    grant_type = required(form, "grant_type")
    if grant_type not in GRANTS:
        raise UnsupportedGrantType(f"grant_type {grant_type[:40]!r} is not supported")
    client = await _authenticate_client(request, form)
    if grant_type not in client.grants:
        raise UnauthorizedClient(f"this client may not use the {grant_type} grant")
    if grant_type == "password":
        username, password = required(form, "username"), required(form, "password")
        grant = await run_in_threadpool(
            service.login, username, password, client, form.get("scope"), info
        )
    else:
        if "scope" in form:
            raise InvalidRequest("a refresh keeps the session's scope; omit scope")
        refresh_token = required(form, "refresh_token")
        grant = await run_in_threadpool(service.refresh, refresh_token, client, info)
    return JSONResponse(_token_body(grant), headers=NO_STORE)


@router.post(
    "/oauth/revoke",
    response_class=Response,
    openapi_extra=oas.REVOKE_REQUEST,
    responses=oas.REVOKE_RESPONSES,
)
async def revoke(request: Request, service: Service, info: Info) -> Response:
    form = await read_form(request)
    client = await _authenticate_client(request, form)
    token_value = required(form, "token")  # token_type_hint needs no reading: both are tried
    await run_in_threadpool(service.revoke, token_value, client, info)
    return Response(status_code=200, headers=NO_STORE)


@router.post(
    "/oauth/introspect", openapi_extra=oas.INTROSPECT_REQUEST, responses=oas.INTROSPECT_RESPONSES
)
async def introspect(request: Request, service: Service) -> JSONResponse:
    form = await read_form(request)
    client = await _authenticate_client(request, form)
    if not client.is_confidential:
        raise InvalidClient("introspection needs a confidential client")
    token_value = required(form, "token")
    body = await run_in_threadpool(service.introspect, token_value, form.get("token_type_hint"))
    return JSONResponse(body, headers=NO_STORE)


@router.get("/.well-known/oauth-authorization-server", responses=oas.METADATA_RESPONSES)
async def metadata(request: Request) -> JSONResponse:
    issuer = request.app.state.settings.issuer
    return JSONResponse(
        {
            "issuer": issuer,
            "token_endpoint": f"{issuer}/oauth/token",
            "revocation_endpoint": f"{issuer}/oauth/revoke",
            "introspection_endpoint": f"{issuer}/oauth/introspect",
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            "grant_types_supported": ["password", "refresh_token"],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
            "revocation_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
            "introspection_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
            ],
        }
    )


@router.get("/.well-known/jwks.json", responses=oas.JWKS_RESPONSES)
async def jwks(service: Service) -> JSONResponse:
    keys = await run_in_threadpool(service.jwks)
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=60"})


async def _bearer(request: Request, service: Service) -> tuple[AccessClaims, SessionState]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise BearerError("a bearer access token is required", error="invalid_request")
    try:
        return await run_in_threadpool(service.authenticate, value.strip())
    except InvalidToken as e:
        raise BearerError(e.reason) from None


Caller = Annotated[tuple[AccessClaims, SessionState], Depends(_bearer)]


@router.post(
    "/sessions/current/activity",
    status_code=204,
    openapi_extra=oas.BEARER,
    responses=oas.NO_CONTENT_RESPONSES,
)
async def activity(caller: Caller, service: Service, info: Info) -> Response:
    await run_in_threadpool(service.record_activity, caller[1], info)
    return Response(status_code=204, headers=NO_STORE)


@router.get("/sessions", openapi_extra=oas.BEARER, responses=oas.SESSIONS_RESPONSES)
async def sessions(caller: Caller, service: Service) -> JSONResponse:
    claims, _ = caller
    states = await run_in_threadpool(service.list_sessions, claims.subject)
    policy = service.policy
    body = [_session_body(s, claims.session_id, policy) for s in states]
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
        raise NotFound(session_id)
    return Response(status_code=204, headers=NO_STORE)


@router.delete(
    "/sessions", status_code=204, openapi_extra=oas.BEARER, responses=oas.NO_CONTENT_RESPONSES
)
async def end_all_sessions(caller: Caller, service: Service, info: Info) -> Response:
    claims, _ = caller
    await run_in_threadpool(service.end_all, claims.subject, info)
    return Response(status_code=204, headers=NO_STORE)


async def _authenticate_client(request: Request, form: dict[str, str]) -> Client:
    credentials = client_credentials(request, form)
    if credentials is None:
        raise InvalidClient("client authentication is required")
    accounts = _accounts(request)
    client = await run_in_threadpool(accounts.client, credentials.client_id)
    if client is None:
        raise InvalidClient("unknown client or bad credentials")
    if client.is_confidential:
        secret = credentials.secret
        if secret is None or not await run_in_threadpool(accounts.check_secret, client, secret):
            raise InvalidClient("unknown client or bad credentials")
    elif credentials.secret is not None:
        raise InvalidClient("unknown client or bad credentials")
    return client


def _token_body(grant: TokenGrant) -> dict[str, Any]:
    return {
        "access_token": grant.access_token,
        "token_type": "Bearer",
        "expires_in": grant.expires_in,
        "refresh_token": grant.refresh_token,
        "scope": " ".join(grant.scope),
    }


def _session_body(state: SessionState, current: str, policy: session.Policy) -> dict[str, Any]:
    idle_end = state.last_activity + policy.idle_timeout
    return {
        "id": state.session_id,
        "client_id": state.client_id,
        "started_at": format_timestamp(state.started_at),
        "last_activity": format_timestamp(state.last_activity),
        "idle_expires_at": format_timestamp(idle_end),
        "absolute_expires_at": format_timestamp(session.absolute_end_of(state, policy)),
        "ip": state.ip,
        "user_agent": state.user_agent,
        "current": state.session_id == current,
    }
