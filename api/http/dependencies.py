"""What every route depends on: the service, who is asking, and the bearer."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from api.http.errors import BearerRequired
from api.sessions import RequestInfo, SessionService
from api.tokens import AccessClaims
from projections.session import SessionState

# Dependencies are `async def`: FastAPI runs a plain `def` one in a worker thread, a round trip
# through the thread pool on every request.


async def service_of(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


async def request_info(request: Request) -> RequestInfo:
    ip = request.client.host if request.client else None
    return RequestInfo(str(uuid.uuid4()), ip, request.headers.get("user-agent"))


Service = Annotated[SessionService, Depends(service_of)]
Info = Annotated[RequestInfo, Depends(request_info)]


async def caller_of(request: Request, service: Service) -> tuple[AccessClaims, SessionState]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise BearerRequired("a bearer access token is required")
    return await service.authenticate(value.strip())


Caller = Annotated[tuple[AccessClaims, SessionState], Depends(caller_of)]
