"""The OAuth 2 endpoints: token (RFC 6749), revocation (RFC 7009), introspection (RFC 7662),
server metadata (RFC 8414) and the JWKS."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.accounts import AUTHORIZATION_CODE, CLIENT_CREDENTIALS, INTROSPECT_SCOPE, SUPPORTED_GRANTS
from api.errors import InvalidClient, UnauthorizedClient, UnsupportedGrantType
from api.http import openapi as oas
from api.http.dependencies import Info, Service, authenticated_client
from api.http.errors import NO_STORE
from api.http.forms import read_form, required
from api.http.proofs import nonced, request_proof, taken_once, token_request_proof
from api.sessions import TokenGrant
from api.signals import Signals

router = APIRouter()


@router.post("/oauth/token", openapi_extra=oas.TOKEN_REQUEST, responses=oas.TOKEN_RESPONSES)
async def token(request: Request, service: Service, info: Info) -> JSONResponse:
    form = await read_form(request)
    grant_type = required(form, "grant_type")
    if grant_type not in SUPPORTED_GRANTS:
        raise UnsupportedGrantType(f"grant_type {grant_type[:40]!r} is not supported")
    client = await authenticated_client(request, form, info)
    if grant_type not in client.grants:
        raise UnauthorizedClient(f"this client may not use the {grant_type} grant")
    # RFC 9449 §5: a proof binds the session (or the client's own token), or must match its key.
    proof = token_request_proof(request, client)
    if grant_type != "refresh_token":  # a refresh takes its proof in its own transaction
        await taken_once(request, proof)
    jkt = None if proof is None else proof.jkt
    if grant_type == "password":
        username, password = required(form, "username"), required(form, "password")
        grant = await run_in_threadpool(
            service.login, username, password, client, form.get("scope"), info, jkt
        )
    elif grant_type == AUTHORIZATION_CODE:  # RFC 6749 §4.1.3, RFC 7636 §4.5
        code, redirect_uri = required(form, "code"), required(form, "redirect_uri")
        verifier = required(form, "code_verifier")
        grant = await run_in_threadpool(
            service.redeem_code, code, client, redirect_uri, verifier, info, jkt
        )
    elif grant_type == CLIENT_CREDENTIALS:
        # RFC 6749 §4.4.2: only a confidential client, which add_client ensures of this grant.
        grant = await run_in_threadpool(service.grant_client, client, form.get("scope"), info, jkt)
    else:
        refresh_token = required(form, "refresh_token")
        scope = form.get("scope")
        grant = await service.refresh(refresh_token, client, info, proof, scope)
    return JSONResponse(_token_body(grant), headers=nonced(request, NO_STORE))


@router.post(
    "/oauth/revoke",
    response_class=Response,
    openapi_extra=oas.REVOKE_REQUEST,
    responses=oas.REVOKE_RESPONSES,
)
async def revoke(request: Request, service: Service, info: Info) -> Response:
    form = await read_form(request)
    client = await authenticated_client(request, form, info)
    token_value = required(form, "token")  # token_type_hint needs no reading: both are tried
    # A bound session is revoked only with its key's proof: whoever stole its token and cannot
    # use it cannot log its owner out either.
    proof = await request_proof(request, nonces=request.app.state.dpop_nonces)
    jkt = None if proof is None else proof.jkt
    await run_in_threadpool(service.revoke, token_value, client, info, jkt)
    return Response(status_code=200, headers=nonced(request, NO_STORE))


@router.post(
    "/oauth/introspect", openapi_extra=oas.INTROSPECT_REQUEST, responses=oas.INTROSPECT_RESPONSES
)
async def introspect(request: Request, service: Service, info: Info) -> JSONResponse:
    form = await read_form(request)
    client = await authenticated_client(request, form, info)
    if not client.is_confidential:
        raise InvalidClient("introspection needs a confidential client")
    if INTROSPECT_SCOPE not in client.scopes:
        raise UnauthorizedClient(
            f"this client may not introspect tokens; it needs the client scope {INTROSPECT_SCOPE}"
        )
    token_value = required(form, "token")
    body = await service.introspect(token_value, form.get("token_type_hint"))
    return JSONResponse(body, headers=NO_STORE)


@router.get("/.well-known/oauth-authorization-server", responses=oas.METADATA_RESPONSES)
async def metadata(request: Request) -> JSONResponse:
    issuer = request.app.state.settings.issuer
    return JSONResponse(
        {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/oauth/authorize",
            "token_endpoint": f"{issuer}/oauth/token",
            "revocation_endpoint": f"{issuer}/oauth/revoke",
            "introspection_endpoint": f"{issuer}/oauth/introspect",
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            # Not in RFC 8414's registry (which allows more): where resource servers follow
            # session ends (session_ledger_guard reads it).
            "session_ends_endpoint": f"{issuer}/feeds/session-ends",
            "grant_types_supported": list(SUPPORTED_GRANTS),
            "dpop_signing_alg_values_supported": list(request.app.state.settings.dpop_algorithms),
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,  # RFC 9207
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
async def jwks(request: Request, service: Service) -> JSONResponse:
    keys = await run_in_threadpool(service.jwks)
    # The Security Event Token key beside the access-token keys (SSF 1.0 §7.1: one jwks_uri).
    signals: Signals = request.app.state.signals
    body = {"keys": [*keys["keys"], signals.key.public_jwk()]}
    return JSONResponse(body, headers={"Cache-Control": "public, max-age=60"})


def _token_body(grant: TokenGrant) -> dict[str, Any]:
    body = {
        "access_token": grant.access_token,
        "token_type": grant.token_type,
        "expires_in": grant.expires_in,
        "scope": " ".join(grant.scope),
    }
    if grant.refresh_token is not None:  # RFC 6749 §4.4.3: none for client_credentials
        body["refresh_token"] = grant.refresh_token
    return body
