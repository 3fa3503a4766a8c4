"""Browser mode: the refresh token lives only in an HttpOnly cookie, the access token only in the
page's memory, and every cookie-authenticated call must come from an allowed Origin and carry a
custom header, which a cross-site page cannot add. The session rules are SessionService's, the
same as at /oauth/token.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.accounts import AUTHORIZATION_CODE, Client, ClientDirectory
from api.errors import InvalidGrant, InvalidRequest, UnauthorizedClient
from api.http import openapi as oas
from api.http.dependencies import Info, Service
from api.http.edge import DEMO_PATH
from api.http.errors import (
    NO_STORE,
    BrowserClientRefused,
    CrossSiteRequestRefused,
    error_response,
)
from api.http.forms import json_text, read_json, required_json_text
from api.http.proofs import nonced, proven_key, request_proof, token_request_proof
from api.sessions import RequestInfo, SessionService, TokenGrant
from api.settings import Settings

router = APIRouter()

# The __Host- prefix makes browsers refuse the cookie unless it is Secure, has Path=/ and no
# Domain: a sibling subdomain cannot plant one of this name for us (cookie tossing), as the
# browser-based-apps BCP recommends. The price is Path=/: the browser sends it with every request
# to this host, which only this server reads.
REFRESH_COOKIE = "__Host-ledger-refresh"
COOKIE_PATH = "/"
CUSTOM_HEADER = "X-Requested-With"


async def _require_allowed_origin(request: Request, service: Service, info: Info) -> None:
    """The CSRF defence of every cookie-authenticated endpoint (and of login, against login CSRF).

    A cross-site form cannot set a custom header, and a cross-origin fetch that sets one needs a
    CORS preflight this server never grants; Origin is checked as well, so that a page on a
    sibling origin of the same site (which receives SameSite=Strict cookies) is refused too.
    """
    settings: Settings = request.app.state.settings
    origin = request.headers.get("origin")
    if origin is None or origin not in settings.browser_origins:
        reason, description = "origin", "the request's Origin is missing or not allowed"
    elif not request.headers.get(CUSTOM_HEADER, "").strip():
        reason, description = "header", f"browser requests need the {CUSTOM_HEADER} header"
    else:
        return
    await run_in_threadpool(service.record_browser_refusal, request.url.path, reason, origin, info)
    raise CrossSiteRequestRefused(description)


ALLOWED_ORIGIN_ONLY = [Depends(_require_allowed_origin)]


@router.post(
    "/browser/login",
    dependencies=ALLOWED_ORIGIN_ONLY,
    openapi_extra=oas.BROWSER_LOGIN_REQUEST,
    responses=oas.BROWSER_TOKEN_RESPONSES,
)
async def login(request: Request, service: Service, info: Info) -> JSONResponse:
    body = await read_json(request)
    username, password = required_json_text(body, "username"), required_json_text(body, "password")
    scope = json_text(body, "scope")
    client = await _public_client(request, required_json_text(body, "client_id"), "password")
    # RFC 9449 §5, as at /oauth/token: a proof binds the session to its key.
    jkt = await proven_key(request, client)
    grant = await run_in_threadpool(service.login, username, password, client, scope, info, jkt)
    return _granted(request, grant, service)


@router.post(
    "/browser/token",
    dependencies=ALLOWED_ORIGIN_ONLY,
    openapi_extra=oas.BROWSER_CODE_REQUEST,
    responses=oas.BROWSER_TOKEN_RESPONSES,
)
async def code_login(request: Request, service: Service, info: Info) -> JSONResponse:
    """The end of the authorization-code flow for a page (session-client.js handleRedirect):
    the code, exchanged as at /oauth/token, becomes the same refresh cookie as a login's."""
    body = await read_json(request)
    code, redirect_uri = required_json_text(body, "code"), required_json_text(body, "redirect_uri")
    verifier = required_json_text(body, "code_verifier")
    client_id = required_json_text(body, "client_id")
    client = await _public_client(request, client_id, AUTHORIZATION_CODE)
    jkt = await proven_key(request, client)
    grant = await run_in_threadpool(
        service.redeem_code, code, client, redirect_uri, verifier, info, jkt
    )
    return _granted(request, grant, service)


@router.post(
    "/browser/refresh",
    dependencies=ALLOWED_ORIGIN_ONLY,
    openapi_extra=oas.BROWSER_CLIENT_REQUEST,
    responses=oas.BROWSER_TOKEN_RESPONSES,
)
async def refresh(request: Request, service: Service, info: Info) -> JSONResponse:
    body = await read_json(request)
    client = await _public_client(request, required_json_text(body, "client_id"), "refresh_token")
    proof = token_request_proof(request, client)  # taken by the refresh's transaction
    try:
        token = await _refresh_cookie(request, service, info)
        if not token:
            raise InvalidGrant("there is no browser session: the refresh cookie is missing")
        # A bound session's cookie is worth nothing without its key's proof: a refusal for
        # that is recorded and keeps the cookie, which its owner can go on using.
        grant = await service.refresh(token, client, info, proof)
    except (InvalidGrant, InvalidRequest) as e:
        refused = error_response(e)
        _clear_cookie(refused)  # the cookie is worthless now; keep no copy in the browser
        return refused
    return _granted(request, grant, service)


@router.post(
    "/browser/logout",
    status_code=204,
    dependencies=ALLOWED_ORIGIN_ONLY,
    openapi_extra=oas.BROWSER_CLIENT_REQUEST,
    responses=oas.BROWSER_LOGOUT_RESPONSES,
)
async def logout(request: Request, service: Service, info: Info) -> Response:
    body = await read_json(request)
    client = await _public_client(request, required_json_text(body, "client_id"), None)
    proof = await request_proof(request, nonces=request.app.state.dpop_nonces)
    try:
        token = await _refresh_cookie(request, service, info)
    except InvalidRequest as e:
        refused = error_response(e)
        _clear_cookie(refused)
        return refused
    if token:
        jkt = None if proof is None else proof.jkt
        await run_in_threadpool(service.revoke, token, client, info, jkt)
    response = Response(status_code=204, headers=nonced(request, NO_STORE))
    _clear_cookie(response)
    return response


async def _refresh_cookie(
    request: Request, service: SessionService, info: RequestInfo
) -> str | None:
    """The request's refresh cookie. Two of them make the request ambiguous (one was planted, or
    is left from elsewhere): it is refused and recorded, rather than trusting whichever came
    last, as a cookie parser would."""
    sent = [
        value
        for header in request.headers.getlist("cookie")
        for name, _, value in (pair.strip().partition("=") for pair in header.split(";"))
        if name == REFRESH_COOKIE
    ]
    if len(sent) > 1:
        origin = request.headers.get("origin")
        path = request.url.path
        await run_in_threadpool(service.record_browser_refusal, path, "cookies", origin, info)
        raise InvalidRequest("the request carries more than one refresh cookie")
    return sent[0] if sent else None


@router.get("/static/session-client.js", include_in_schema=False)
async def session_client() -> Response:
    return Response(
        _static("session-client.js"),
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.get(DEMO_PATH, include_in_schema=False)
async def demo(request: Request) -> Response:
    if not request.app.state.settings.demo:
        raise HTTPException(status_code=404)
    page, policy = _demo_page()
    return Response(
        page,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": policy,
            "Referrer-Policy": "no-referrer",
        },
    )


@functools.cache
def _demo_page() -> tuple[bytes, str]:
    """The demo page and its Content-Security-Policy: nothing but this origin, and the page's
    own inline script and style by their hashes (CSP Level 3 hash sources)."""
    page = _static("demo.html")
    script = _inline(page, b'<script type="module">', b"</script>")
    style = _inline(page, b"<style>", b"</style>")
    policy = (
        f"default-src 'none'; script-src 'self' {script}; style-src {style};"
        " connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    return page, policy


def _inline(page: bytes, start: bytes, end: bytes) -> str:
    body = page.split(start, 1)[1].split(end, 1)[0]
    return f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"


def _granted(request: Request, grant: TokenGrant, service: SessionService) -> JSONResponse:
    # SECURITY: the refresh token goes into the HttpOnly cookie and nowhere else; never add it
    # to this body, where the page's scripts (and anything injected into them) could read it.
    body = {
        "access_token": grant.access_token,
        "token_type": grant.token_type,
        "expires_in": grant.expires_in,
        "scope": " ".join(grant.scope),
        "idle_timeout": int(service.policy.idle_timeout.total_seconds()),
    }
    response = JSONResponse(body, headers=nonced(request, NO_STORE))
    assert grant.refresh_token is not None  # a login's or a refresh's grant has one
    response.set_cookie(
        REFRESH_COOKIE,
        grant.refresh_token,
        max_age=grant.session_expires_in,
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


def _clear_cookie(response: Response) -> None:
    # A prefixed cookie is only replaced by one that is Secure too, on the same path.
    response.delete_cookie(
        REFRESH_COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict"
    )


async def _public_client(request: Request, client_id: str, grant: str | None) -> Client:
    clients: ClientDirectory = request.app.state.clients
    client = await clients.client(client_id)
    if client is None or client.is_confidential:
        raise BrowserClientRefused("browser mode needs a registered public client")
    if grant is not None and grant not in client.grants:
        raise UnauthorizedClient(f"this client may not use the {grant} grant")
    return client


@functools.cache
def _static(name: str) -> bytes:
    return resources.files("api.http").joinpath("static", name).read_bytes()
