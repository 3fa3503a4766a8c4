"""OpenID Shared Signals (SSF 1.0) transmitter endpoints over api.signals.

- GET /.well-known/ssf-configuration: the transmitter metadata (SSF 1.0 §7.1).
- /ssf/streams: POST creates a stream (201), GET reads one (`?stream_id=`) or lists the
  receiver's, DELETE deletes one (204) (§8.1.1).
- /ssf/status: GET reads and POST changes a stream's status (§8.1.2).
- POST /ssf/verify: asks for a verification event (§8.1.4), 204.
- POST /ssf/poll/{stream_id}: RFC 8936 poll delivery, with `ack`, `setErrs`, `maxEvents` and
  `returnImmediately`; a long poll waits up to LEDGER_SIGNAL_LONG_POLL.

A receiver is a client with an access token of its own (the client_credentials grant) holding
`ssf.manage` (every call) or `ssf.read` (reads and polls), as the CAEP interoperability profile
names them; it sees only its own streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.errors import InsufficientScope, InvalidRequest
from api.feed import SessionEndHub
from api.http import openapi as oas
from api.http.dependencies import Info, Service
from api.http.errors import NO_STORE, BearerRequired
from api.http.forms import json_text, read_json, required_json_text
from api.http.proofs import access_token
from api.signals import (
    DELIVERY_METHODS,
    EVENTS_SUPPORTED,
    MANAGE_SCOPE,
    POLL,
    READ_SCOPE,
    Signals,
    SignalStream,
)

router = APIRouter()
_NEWS_SECONDS = 0.5
"""How often a long poll looks again when no session end wakes it (a verification does not)."""


@router.get("/.well-known/ssf-configuration", responses=oas.SSF_CONFIGURATION_RESPONSES)
async def configuration(request: Request) -> JSONResponse:
    issuer = request.app.state.settings.issuer
    return JSONResponse(
        {
            "spec_version": "1_0",
            "issuer": issuer,
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            "delivery_methods_supported": list(DELIVERY_METHODS),
            "configuration_endpoint": f"{issuer}/ssf/streams",
            "status_endpoint": f"{issuer}/ssf/status",
            "verification_endpoint": f"{issuer}/ssf/verify",
            "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
            "default_subjects": "ALL",
        }
    )


@router.post(
    "/ssf/streams",
    status_code=201,
    openapi_extra={**oas.SSF_CREATE_REQUEST, **oas.BEARER},
    responses=oas.SSF_CREATE_RESPONSES,
)
async def create_stream(request: Request, service: Service, info: Info) -> JSONResponse:
    client_id = await _receiver(request, service, manage=True)
    body = await read_json(request)
    delivery = body.get("delivery", {"method": POLL})
    if not isinstance(delivery, dict):
        raise InvalidRequest("field 'delivery' must be an object")
    requested = body.get("events_requested")
    if requested is not None and not (
        isinstance(requested, list) and all(isinstance(e, str) for e in requested)
    ):
        raise InvalidRequest("field 'events_requested' must be an array of strings")
    signals = _signals(request)
    stream = await run_in_threadpool(
        lambda: signals.create(
            client_id,
            method=required_json_text(delivery, "method"),
            endpoint_url=json_text(delivery, "endpoint_url"),
            authorization_header=json_text(delivery, "authorization_header"),
            events_requested=requested,
            description=json_text(body, "description"),
            meta=info.metadata(client_id),
        )
    )
    return JSONResponse(_config(signals, stream), status_code=201, headers=NO_STORE)


@router.get(
    "/ssf/streams", openapi_extra=oas.BEARER, responses=oas.SSF_READ_RESPONSES, response_model=None
)
async def read_streams(
    request: Request, service: Service, stream_id: str | None = None
) -> JSONResponse:
    client_id = await _receiver(request, service, manage=False)
    signals = _signals(request)
    if stream_id is None:
        streams = await run_in_threadpool(signals.streams, client_id)
        return JSONResponse([_config(signals, s) for s in streams], headers=NO_STORE)
    stream = await run_in_threadpool(signals.stream, client_id, stream_id)
    return JSONResponse(_config(signals, stream), headers=NO_STORE)


@router.delete(
    "/ssf/streams", status_code=204, openapi_extra=oas.BEARER, responses=oas.SSF_EMPTY_RESPONSES
)
async def delete_stream(request: Request, service: Service, info: Info, stream_id: str) -> Response:
    client_id = await _receiver(request, service, manage=True)
    meta = info.metadata(client_id)
    await run_in_threadpool(_signals(request).delete, client_id, stream_id, meta)
    return Response(status_code=204, headers=NO_STORE)


@router.get("/ssf/status", openapi_extra=oas.BEARER, responses=oas.SSF_STATUS_RESPONSES)
async def read_status(request: Request, service: Service, stream_id: str) -> JSONResponse:
    client_id = await _receiver(request, service, manage=False)
    stream = await run_in_threadpool(_signals(request).stream, client_id, stream_id)
    return JSONResponse(_status(stream), headers=NO_STORE)


@router.post(
    "/ssf/status",
    openapi_extra={**oas.SSF_STATUS_REQUEST, **oas.BEARER},
    responses=oas.SSF_STATUS_RESPONSES,
)
async def update_status(request: Request, service: Service, info: Info) -> JSONResponse:
    client_id = await _receiver(request, service, manage=True)
    body = await read_json(request)
    stream_id, status = required_json_text(body, "stream_id"), required_json_text(body, "status")
    reason = json_text(body, "reason")
    stream = await run_in_threadpool(
        _signals(request).set_status, client_id, stream_id, status, reason, info.metadata(client_id)
    )
    return JSONResponse(_status(stream), headers=NO_STORE)


@router.post(
    "/ssf/verify",
    status_code=204,
    openapi_extra={**oas.SSF_VERIFY_REQUEST, **oas.BEARER},
    responses=oas.SSF_EMPTY_RESPONSES,
)
async def verify(request: Request, service: Service, info: Info) -> Response:
    client_id = await _receiver(request, service, manage=True)
    body = await read_json(request)
    stream_id, state = required_json_text(body, "stream_id"), json_text(body, "state")
    await run_in_threadpool(
        _signals(request).request_verification,
        client_id,
        stream_id,
        state,
        info.metadata(client_id),
    )
    return Response(status_code=204, headers=NO_STORE)


@router.post(
    "/ssf/poll/{stream_id}",
    openapi_extra={**oas.SSF_POLL_REQUEST, **oas.BEARER},
    responses=oas.SSF_POLL_RESPONSES,
)
async def poll(request: Request, service: Service, info: Info, stream_id: str) -> JSONResponse:
    client_id = await _receiver(request, service, manage=False)
    body = await read_json(request)
    max_events = body.get("maxEvents")
    if max_events is not None and (
        not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 0
    ):
        raise InvalidRequest("field 'maxEvents' must be a non-negative integer")
    immediately = body.get("returnImmediately", False)
    if not isinstance(immediately, bool):
        raise InvalidRequest("field 'returnImmediately' must be a boolean")
    acks, errors = _acks(body.get("ack", [])), _set_errors(body.get("setErrs", {}))
    signals, meta = _signals(request), info.metadata(client_id)

    def take(
        acks: list[str], errors: dict[str, tuple[str, str | None]]
    ) -> tuple[dict[str, str], bool]:
        return signals.poll(
            client_id, stream_id, max_events=max_events, acks=acks, errors=errors, meta=meta
        )

    sets, more = await run_in_threadpool(take, acks, errors)
    if not sets and not immediately and max_events != 0:
        hub: SessionEndHub = request.app.state.session_ends
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.app.state.settings.signal_long_poll.total_seconds()
        while not sets and (left := deadline - loop.time()) > 0 and not hub.closed:
            await hub.news(min(left, _NEWS_SECONDS))
            sets, more = await run_in_threadpool(take, [], {})
    return JSONResponse({"sets": sets, "moreAvailable": more}, headers=NO_STORE)


async def _receiver(request: Request, service: Service, *, manage: bool) -> str:
    """The client id of the receiver the bearer token belongs to; RFC 6750 refusals for any
    other caller."""
    scopes = (MANAGE_SCOPE,) if manage else (MANAGE_SCOPE, READ_SCOPE)
    needs = f"the {' or '.join(scopes)} scope is required"
    presented = await access_token(request)
    if presented is None:
        raise BearerRequired(f"a bearer access token is required; {needs}")
    claims, _ = await service.verify_bearer(*presented)
    if claims.session_id is not None:
        raise InsufficientScope("streams belong to receivers: use a client_credentials token")
    if not set(scopes) & set(claims.scope):
        raise InsufficientScope(needs)
    return claims.client_id


def _signals(request: Request) -> Signals:
    signals: Signals = request.app.state.signals
    return signals


def _config(signals: Signals, stream: SignalStream) -> dict[str, Any]:
    """The stream's configuration as SSF 1.0 §8.1.1 shows it; a push endpoint's authorization
    header is never shown."""
    endpoint = stream.endpoint_url or f"{signals.issuer}/ssf/poll/{stream.stream_id}"
    config: dict[str, Any] = {
        "stream_id": stream.stream_id,
        "iss": signals.issuer,
        "aud": stream.client_id,
        "delivery": {"method": stream.method, "endpoint_url": endpoint},
        "events_supported": list(EVENTS_SUPPORTED),
        "events_delivered": list(stream.events_delivered),
    }
    if stream.description is not None:
        config["description"] = stream.description
    return config


def _status(stream: SignalStream) -> dict[str, str]:
    status = {"stream_id": stream.stream_id, "status": stream.status}
    return status if stream.reason is None else {**status, "reason": stream.reason}


def _acks(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(jti, str) for jti in value):
        raise InvalidRequest("field 'ack' must be an array of jti strings")
    return value


def _set_errors(value: object) -> dict[str, tuple[str, str | None]]:
    """RFC 8936 §2.2 `setErrs`: each jti's `err` (required) and `description`."""
    if not isinstance(value, dict):
        raise InvalidRequest("field 'setErrs' must be an object")
    errors = {}
    for jti, error in value.items():
        if not isinstance(error, dict):
            raise InvalidRequest("each of 'setErrs' must be an object with 'err'")
        errors[jti] = (required_json_text(error, "err"), json_text(error, "description"))
    return errors
