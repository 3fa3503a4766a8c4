"""What every route depends on: the service, who is asking, and the bearer."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Annotated

from fastapi import Depends, Request

from api.accounts import Client
from api.clients import ClientAuthentication
from api.errors import InvalidClient
from api.http.errors import BearerRequired
from api.http.forms import client_credentials
from api.http.proofs import access_token
from api.sessions import RequestInfo, SessionService
from api.settings import IPNetwork
from api.tokens import AccessClaims
from projections.session import SessionState

# Dependencies are `async def`: FastAPI runs a plain `def` one in a worker thread, a round trip
# through the thread pool on every request.


async def service_of(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


async def request_info(request: Request) -> RequestInfo:
    peer = request.client.host if request.client else None
    trusted: tuple[IPNetwork, ...] = request.app.state.settings.trusted_proxies
    forwarded = client_address(peer, request.headers.getlist("x-forwarded-for"), trusted)
    user_agent = request.headers.get("user-agent")
    if forwarded is None:
        return RequestInfo(str(uuid.uuid4()), peer, user_agent)
    return RequestInfo(str(uuid.uuid4()), forwarded, user_agent, peer=peer)


def client_address(
    peer: str | None, forwarded_for: list[str], trusted: tuple[IPNetwork, ...]
) -> str | None:
    """The client address a trusted proxy forwarded, or None to use the peer's own.

    X-Forwarded-For is read only from a peer in `trusted`, right to left, past every trusted
    proxy; the first address beyond them is the client's, and it must be a well-formed IP
    address (else None: anyone can write anything there).
    """
    if not trusted or not _in(_parse(peer), trusted):
        return None
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            return None
        if not _in(address, trusted):
            return str(address)
    return None


def _parse(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    networks: tuple[IPNetwork, ...],
) -> bool:
    return address is not None and any(address in network for network in networks)


Service = Annotated[SessionService, Depends(service_of)]
Info = Annotated[RequestInfo, Depends(request_info)]


async def authenticated_client(request: Request, form: dict[str, str], info: RequestInfo) -> Client:
    """The client the request authenticates as (HTTP Basic or the form, RFC 6749 §2.3.1);
    InvalidClient when it names none or its credentials fail."""
    credentials = client_credentials(request, form)
    if credentials is None:
        raise InvalidClient("client authentication is required")
    authentication: ClientAuthentication = request.app.state.client_authentication
    return await authentication.authenticate(credentials.client_id, credentials.secret, info)


async def caller_of(request: Request, service: Service) -> tuple[AccessClaims, SessionState]:
    presented = await access_token(request)
    if presented is None:
        raise BearerRequired("a bearer access token is required")
    return await service.authenticate(*presented)


Caller = Annotated[tuple[AccessClaims, SessionState], Depends(caller_of)]
