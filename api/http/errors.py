"""The one error table of the HTTP edge: every refusal's status, RFC 6749 §5.2 / RFC 6750 §3 error
code and headers, looked up along the raised class's MRO.

This module is the only place that knows error codes and their status codes. The core raises
`api.errors.Refusal`s and the ledger `LedgerError`s; handlers are registered on those bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.errors import (
    DpopBindingRefused,
    InsufficientScope,
    InvalidClient,
    InvalidDpopProof,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidToken,
    NotFound,
    Refusal,
    TooManyAttempts,
    UnauthorizedClient,
    UnsupportedGrantType,
    UseDpopNonce,
)
from ledger.errors import DatabaseUnavailable, LedgerError

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
REALM = "session-ledger"


class CrossSiteRequestRefused(InvalidRequest):
    """A browser request without an allowed Origin or without the X-Requested-With header."""


class BrowserClientRefused(InvalidClient):
    """Browser mode named no public client; a page cannot keep a client secret."""


class BearerRequired(InvalidRequest):
    """A bearer-authenticated call came without an access token."""


class ResourceProofRefused(InvalidDpopProof):
    """A resource request's DPoP proof failed (RFC 9449 §7.1): a 401 with a DPoP challenge,
    where the token endpoint answers 400."""


@dataclass(frozen=True)
class Answer:
    """How one class of refusal is answered."""

    status: int
    error: str
    challenge: str | None = None
    """`Basic`, `Bearer` or `DPoP`: the WWW-Authenticate scheme of a 401 or 403."""
    description: str | None = None
    """A fixed error_description, for errors whose own text must not reach the caller (SQL)."""
    retry_after: int | None = None


ANSWERS: dict[type[Exception], Answer] = {
    Refusal: Answer(400, "invalid_request"),  # a refusal without a row of its own
    InvalidRequest: Answer(400, "invalid_request"),
    CrossSiteRequestRefused: Answer(403, "invalid_request"),
    BearerRequired: Answer(401, "invalid_request", "Bearer"),
    RequestValidationError: Answer(
        400, "invalid_request", description="malformed request parameters"
    ),
    InvalidClient: Answer(401, "invalid_client", "Basic"),
    # RFC 6749 §5.2 allows 400 when no Authorization header was sent, and a 401 with a Basic
    # challenge would make the browser ask its user for a password.
    BrowserClientRefused: Answer(400, "invalid_client"),
    UnauthorizedClient: Answer(400, "unauthorized_client"),
    UnsupportedGrantType: Answer(400, "unsupported_grant_type"),
    InvalidGrant: Answer(400, "invalid_grant"),
    InvalidScope: Answer(400, "invalid_scope"),
    InvalidDpopProof: Answer(400, "invalid_dpop_proof"),  # RFC 9449 §5 at the token endpoint
    ResourceProofRefused: Answer(401, "invalid_dpop_proof", "DPoP"),
    UseDpopNonce: Answer(400, "use_dpop_nonce"),  # RFC 9449 §8, with a DPoP-Nonce header
    DpopBindingRefused: Answer(401, "invalid_token", "DPoP"),
    # `slow_down` is the code RFC 8628 registers for token endpoint responses.
    TooManyAttempts: Answer(429, "slow_down"),
    InvalidToken: Answer(401, "invalid_token", "Bearer"),
    InsufficientScope: Answer(403, "insufficient_scope", "Bearer"),
    NotFound: Answer(404, "not_found"),
    DatabaseUnavailable: Answer(
        503, "temporarily_unavailable", description="the database cannot be reached", retry_after=5
    ),
    # Any other ledger failure (a lost race, a refused statement): its text may hold SQL.
    LedgerError: Answer(
        503,
        "temporarily_unavailable",
        description="the ledger could not complete the request; retry it",
        retry_after=1,
    ),
}


def answer_for(exc: Exception) -> Answer:
    """The table's answer for the most specific class of `exc` that it lists."""
    for cls in type(exc).__mro__:
        if cls in ANSWERS:
            return ANSWERS[cls]
    raise LookupError(f"no answer for {type(exc).__name__}")


def error_response(exc: Exception) -> JSONResponse:
    """The RFC-shaped JSON error response for a refusal (or a ledger failure)."""
    answer = answer_for(exc)
    description = answer.description or getattr(exc, "description", None) or answer.error
    headers = dict(NO_STORE)
    if answer.challenge == "Basic":
        headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
    elif answer.challenge in ("Bearer", "DPoP"):
        headers["WWW-Authenticate"] = _challenge(answer.challenge, answer, description)
    if isinstance(exc, UseDpopNonce):
        headers["DPoP-Nonce"] = exc.nonce
    retry_after = _retry_after(exc, answer)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(error_body(answer.error, description), answer.status, headers)


def error_body(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


def install(app: FastAPI) -> None:
    """Answer every refusal, request validation error and ledger failure from the table."""
    for base in (Refusal, RequestValidationError, LedgerError):
        app.add_exception_handler(base, _handle)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def _challenge(scheme: str, answer: Answer, description: str) -> str:
    """RFC 6750 §3 (Bearer) or RFC 9449 §7.1 (DPoP)."""
    challenge = f'{scheme} realm="{REALM}", error="{answer.error}"'
    if answer.status == 401 and answer.error in ("invalid_token", "invalid_dpop_proof"):
        challenge += f', error_description="{description}"'
    return challenge


def _retry_after(exc: Exception, answer: Answer) -> int | None:
    if isinstance(exc, TooManyAttempts):
        return max(1, math.ceil(exc.retry_after.total_seconds()))
    return answer.retry_after
