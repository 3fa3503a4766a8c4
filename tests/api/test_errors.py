"""The one error table: every refusal of the core and every ledger failure, raised through a route,
is an RFC 6749 / 6750 error answer, never a 500, and a ledger failure's text (which may hold SQL)
never reaches the caller."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import errors as core
from api.http import errors
from ledger.errors import LedgerError

LEAKY = "PostgreSQL refused the statement: SELECT password_hash FROM users"


def _subclasses(base: type[Exception]) -> list[type[Exception]]:
    found: list[type[Exception]] = [base]
    for sub in base.__subclasses__():
        found += _subclasses(sub)
    return found


def _instance(cls: type[Exception]) -> Exception:
    if issubclass(cls, core.TooManyAttempts):
        return cls("too many", timedelta(seconds=2.5))
    if issubclass(cls, core.UseDpopNonce):
        return cls("the nonce", "a-nonce")
    if issubclass(cls, core.Refusal):
        return cls("why it was refused")
    # Ledger errors take constructor arguments of their own; the message is what matters here.
    exc = cls.__new__(cls)
    Exception.__init__(exc, LEAKY)
    return exc


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = FastAPI()
    errors.install(app)
    raised: dict[str, Exception] = {}

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise raised[name]

    app.state.raised = raised
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


CLASSES = sorted(
    {*_subclasses(core.Refusal), *_subclasses(LedgerError)}, key=lambda c: c.__qualname__
)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_every_refusal_and_ledger_error_is_an_rfc_error_never_a_500(
    client: TestClient, cls: type[Exception]
) -> None:
    client.app.state.raised[cls.__qualname__] = _instance(cls)  # type: ignore[attr-defined]
    response = client.get(f"/raise/{cls.__qualname__}")
    assert 400 <= response.status_code < 500 or response.status_code == 503
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"]
    assert body["error_description"]
    assert "SELECT" not in response.text
    if response.status_code in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    if response.status_code == 401:
        assert response.headers["www-authenticate"].split()[0] in ("Basic", "Bearer", "DPoP")


@pytest.mark.parametrize(
    ("exc", "status", "error", "challenge"),
    [
        (core.InvalidClient("bad secret"), 401, "invalid_client", 'Basic realm="session-ledger"'),
        (errors.BrowserClientRefused("public only"), 400, "invalid_client", None),
        (errors.CrossSiteRequestRefused("no origin"), 403, "invalid_request", None),
        (
            core.InvalidToken("token has expired"),
            401,
            "invalid_token",
            'Bearer realm="session-ledger", error="invalid_token",'
            ' error_description="token has expired"',
        ),
        (
            core.InsufficientScope("audit needed"),
            403,
            "insufficient_scope",
            'Bearer realm="session-ledger", error="insufficient_scope"',
        ),
        (
            errors.BearerRequired("no token"),
            401,
            "invalid_request",
            'Bearer realm="session-ledger", error="invalid_request"',
        ),
        (core.TooManyAttempts("slow", timedelta(seconds=2.5)), 429, "slow_down", None),
        (core.NotFound("no such session"), 404, "not_found", None),
        (core.InvalidDpopProof("bad proof"), 400, "invalid_dpop_proof", None),
        (core.UseDpopNonce("a nonce, please", "n1"), 400, "use_dpop_nonce", None),
        (
            errors.ResourceProofRefused("bad proof"),
            401,
            "invalid_dpop_proof",
            'DPoP realm="session-ledger", error="invalid_dpop_proof",'
            ' error_description="bad proof"',
        ),
        (
            core.DpopBindingRefused("bound"),
            401,
            "invalid_token",
            'DPoP realm="session-ledger", error="invalid_token", error_description="bound"',
        ),
    ],
)
def test_the_table_answers_a_subclass_before_its_base(
    exc: Exception, status: int, error: str, challenge: str | None
) -> None:
    response = errors.error_response(exc)
    assert (response.status_code, response.body) == (
        status,
        f'{{"error":"{error}","error_description":"{exc}"}}'.encode(),
    )
    assert response.headers.get("www-authenticate") == challenge


def test_retry_after_rounds_the_wait_up() -> None:
    response = errors.error_response(core.TooManyAttempts("slow", timedelta(seconds=2.5)))
    assert response.headers["retry-after"] == "3"
