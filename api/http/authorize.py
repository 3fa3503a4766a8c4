"""The authorization endpoint (RFC 6749 §4.1, PKCE RFC 7636, RFC 9207's `iss`) and its hosted
login page: the user types the password here, never into the app, which gets a code.

Until the client and its redirect URI are known to match a registration, errors go to an error
page: redirecting to an unchecked URI would make this server an open redirector (§4.1.2.1).
After that, they go back to the redirect URI with `error`, `state` and `iss`.

The page is plain HTML that works without JavaScript. Its form carries a CSRF token, an HMAC of
a random value in a `__Host-` cookie, so that no other site can post a login through the
user's browser (login CSRF). It may not be framed, and its Content-Security-Policy lets it load
nothing but its own style and post only to this server, which then redirects to the app.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from html import escape
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from api.accounts import AUTHORIZATION_CODE, Client, ClientDirectory
from api.errors import InvalidGrant, InvalidRequest, InvalidScope, TooManyAttempts
from api.http.dependencies import Info, Service
from api.http.forms import FORM_TYPE, parse_form, read_body
from api.tokens import is_scope_token
from projections.code import CHALLENGE

router = APIRouter()

LOGIN_COOKIE = "__Host-ledger-authorize"
_PARAMETERS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "code_challenge",
    "code_challenge_method",
    "state",
    "scope",
)
_LOGIN_FIELDS = ("username", "password", "csrf_token")
_STYLE = """body{font:16px/1.5 system-ui,sans-serif;max-width:24rem;margin:3rem auto;padding:0 1rem}
label{display:block;margin-top:1rem;font-weight:600}
input{display:block;width:100%;box-sizing:border-box;padding:.5rem;font:inherit}
button{margin-top:1.5rem;padding:.6rem 1.2rem;font:inherit}
.error{border:2px solid #b00020;color:#b00020;padding:.5rem 1rem}"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


class PageError(Exception):
    """A refusal shown on an error page: the redirect URI is not (yet) to be trusted."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class RedirectError(Exception):
    """A refusal sent back to the (registered) redirect URI, RFC 6749 §4.1.2.1."""

    def __init__(self, error: str, description: str, request: AuthorizationRequest) -> None:
        super().__init__(description)
        self.error, self.description, self.request = error, description, request


@dataclass(frozen=True)
class AuthorizationRequest:
    """An authorization request whose client and redirect URI match a registration."""

    client: Client
    redirect_uri: str
    state: str | None
    code_challenge: str = ""
    scope: str | None = None

    def hidden_fields(self) -> dict[str, str]:
        fields = {
            "response_type": "code",
            "client_id": self.client.client_id,
            "redirect_uri": self.redirect_uri,
            "code_challenge": self.code_challenge,
            "code_challenge_method": "S256",
        }
        if self.state is not None:
            fields["state"] = self.state
        if self.scope is not None:
            fields["scope"] = self.scope
        return fields


@router.get("/oauth/authorize", include_in_schema=False)
async def authorize_page(request: Request) -> Response:
    try:
        authorization = await _validated(request, parse_form(request.url.query.encode()))
    except (InvalidRequest, PageError) as refused:
        return _error_page(refused.description)
    except RedirectError as refused:
        return _redirect_error(request, refused)
    cookie = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    response = _login_page(request, authorization, cookie, None, 200)
    _set_login_cookie(response, cookie)
    return response


@router.post("/oauth/authorize", include_in_schema=False)
async def authorize_login(request: Request, service: Service, info: Info) -> Response:
    try:
        form = parse_form(await read_body(request, FORM_TYPE))
    except InvalidRequest as refused:
        return _error_page(refused.description)
    # A forged post does nothing at all: neither a login nor a redirect.
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    origin = request.headers.get("origin")
    if origin is not None and origin != _origin(request.app.state.settings.issuer):
        return _error_page("the login form was posted from another site", 403)
    token = form.get("csrf_token", "").encode()
    if not cookie or not hmac.compare_digest(token, _csrf(request, cookie).encode()):
        return _error_page(
            "the login form has expired or did not come from this server; start again from"
            " the application",
            403,
        )
    try:
        authorization = await _validated(request, form)
    except PageError as refused:
        return _error_page(refused.description)
    except RedirectError as refused:
        return _redirect_error(request, refused)
    try:
        code = await run_in_threadpool(
            service.authorize,
            form.get("username", ""),
            form.get("password", ""),
            authorization.client,
            authorization.scope,
            authorization.redirect_uri,
            authorization.code_challenge,
            info,
        )
    except InvalidScope as refused:
        return _redirect_error(
            request, RedirectError("invalid_scope", refused.description, authorization)
        )
    except TooManyAttempts as refused:
        return _login_page(request, authorization, cookie, refused.description, 429)
    except InvalidGrant as refused:
        return _login_page(request, authorization, cookie, refused.description, 400)
    return _redirect(request, authorization, {"code": code})


async def _validated(request: Request, params: dict[str, str]) -> AuthorizationRequest:
    """The request's client and redirect URI, then the rest of it (RFC 6749 §4.1.1, RFC 7636
    §4.3): PageError before the redirect URI is trusted, RedirectError after."""
    client_id = params.get("client_id", "")
    if not client_id:
        raise PageError("the request names no client (client_id is missing)")
    clients: ClientDirectory = request.app.state.clients
    client = await clients.client(client_id)
    if client is None:
        raise PageError("the request names an unknown client")
    redirect_uri = params.get("redirect_uri", "")
    if not redirect_uri:
        raise PageError("the request has no redirect_uri")
    if redirect_uri not in client.redirect_uris:  # RFC 9700 §2.1: exact string comparison
        raise PageError("the redirect_uri is not one registered for this client")
    state = params.get("state") or None
    authorization = AuthorizationRequest(client, redirect_uri, state)
    unknown = [name for name in params if name not in (*_PARAMETERS, *_LOGIN_FIELDS)]
    if unknown:
        refused = f"unknown parameter {unknown[0][:40]!r}"
        raise RedirectError("invalid_request", refused, authorization)
    if params.get("response_type") != "code":
        refused = "response_type must be code"
        raise RedirectError("unsupported_response_type", refused, authorization)
    if AUTHORIZATION_CODE not in client.grants:
        refused = f"this client may not use the {AUTHORIZATION_CODE} grant"
        raise RedirectError("unauthorized_client", refused, authorization)
    challenge = params.get("code_challenge", "")
    if not challenge:
        refused = "code_challenge is required (PKCE, RFC 7636)"
        raise RedirectError("invalid_request", refused, authorization)
    if params.get("code_challenge_method") != "S256":
        refused = "code_challenge_method must be S256 (plain is not accepted)"
        raise RedirectError("invalid_request", refused, authorization)
    if not CHALLENGE.fullmatch(challenge):
        refused = "code_challenge must be the unpadded base64url of a SHA-256 (43 characters)"
        raise RedirectError("invalid_request", refused, authorization)
    scope = params.get("scope") or None
    if scope is not None and not all(is_scope_token(s) for s in scope.split(" ")):
        raise RedirectError("invalid_scope", "scope is not a list of scope tokens", authorization)
    return AuthorizationRequest(client, redirect_uri, state, challenge, scope)


def _redirect(
    request: Request, authorization: AuthorizationRequest, params: dict[str, str]
) -> Response:
    """303 to the redirect URI, its own query kept (RFC 6749 §3.1.2), with `params`, the
    `state` and the issuer (RFC 9207 §2)."""
    parts = urlsplit(authorization.redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += list(params.items())
    if authorization.state is not None:
        query.append(("state", authorization.state))
    query.append(("iss", request.app.state.settings.issuer))
    location = urlunsplit(parts._replace(query=urlencode(query)))
    return RedirectResponse(location, status_code=303, headers=_PAGE_HEADERS)


def _redirect_error(request: Request, refused: RedirectError) -> Response:
    error = {"error": refused.error, "error_description": refused.description}
    return _redirect(request, refused.request, error)


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, browsers post the form with `Origin: null`. Same-origin sends
    # the address, with its state and challenge, to this server only.
    "Referrer-Policy": "same-origin",
}


def _headers(form_target: str | None) -> dict[str, str]:
    # form-action covers the redirect that follows the post, so the app's origin is named too.
    action = "'self'" if form_target is None else f"'self' {form_target}"
    policy = (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action {action};"
        " frame-ancestors 'none'; base-uri 'none'"
    )
    return {**_PAGE_HEADERS, "Content-Security-Policy": policy}


def _error_page(description: str, status: int = 400) -> Response:
    body = _document(
        "Cannot sign in",
        f'<h1>Cannot sign in</h1><p class="error" role="alert">{escape(description)}</p>'
        "<p>Go back to the application and try again.</p>",
    )
    return HTMLResponse(body, status_code=status, headers=_headers(None))


def _login_page(
    request: Request,
    authorization: AuthorizationRequest,
    cookie: str,
    error: str | None,
    status: int,
) -> Response:
    hidden = {**authorization.hidden_fields(), "csrf_token": _csrf(request, cookie)}
    inputs = "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, value in hidden.items()
    )
    alert = "" if error is None else f'<p class="error" role="alert" id="error">{escape(error)}</p>'
    described = ' aria-describedby="error"' if error else ""
    client = escape(authorization.client.client_id)
    body = _document(
        "Sign in",
        f"<h1>Sign in</h1><p>to continue to <strong>{client}</strong></p>{alert}"
        f'<form method="post" action="/oauth/authorize">{inputs}'
        '<label for="username">User name</label>'
        f'<input id="username" name="username" autocomplete="username" required{described}>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password"'
        f' autocomplete="current-password" required{described}>'
        '<button type="submit">Sign in</button></form>',
    )
    return HTMLResponse(
        body, status_code=status, headers=_headers(_origin(authorization.redirect_uri))
    )


def _document(title: str, main: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{main}</main></body></html>"
    )


def _set_login_cookie(response: Response, value: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE, value, path="/", secure=True, httponly=True, samesite="strict"
    )


def _csrf(request: Request, cookie: str) -> str:
    """The form's CSRF token: an HMAC of the cookie, which only this server can compute and
    only the browser that holds the cookie can send back with it."""
    key: bytes = request.app.state.login_form_key
    digest = hmac.digest(key, cookie.encode(), "sha256")
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _origin(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"
