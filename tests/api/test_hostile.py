"""Races, malformed requests and forged tokens against the live API."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from api.accounts import Accounts
from tests.api.conftest import PASSWORD, LiveServer
from tests.api.test_oauth import assert_oauth_error
from tests.api.test_sessions_api import assert_invalid_token, introspect


def race_refreshes(url: str, refresh_token: str, count: int) -> list[requests.Response]:
    form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": refresh_token}
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [
            pool.submit(requests.post, f"{url}/oauth/token", data=form, timeout=60)
            for _ in range(count)
        ]
        return [f.result() for f in futures]


def test_twenty_parallel_refreshes_yield_one_successor(live: LiveServer) -> None:
    tokens = live.login()
    responses = race_refreshes(live.url, tokens["refresh_token"], 20)
    successors = {r.json()["refresh_token"] for r in responses if r.status_code == 200}
    refused = [r for r in responses if r.status_code != 200]
    assert len(successors) == 1
    assert all(r.json()["error"] == "invalid_grant" for r in refused), [r.text for r in refused]
    assert live.types().count("RefreshTokenRotated") == 1
    assert "RefreshTokenReuseDetected" not in live.types()
    assert live.refresh(successors.pop()).status_code == 200


def _form_body(fields: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in fields.items())


LOGIN = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (_form_body(LOGIN) + "&username=bob", FORM_HEADERS),  # a repeated field
        (json.dumps(LOGIN), {"Content-Type": "application/json"}),  # wrong content type
        (_form_body(LOGIN).encode() + b"&scope=\xff\xfe", FORM_HEADERS),  # not UTF-8
        (_form_body(LOGIN) + "&scope=%ff", FORM_HEADERS),  # percent-encoded non-UTF-8
        (_form_body({**LOGIN, "scope": "x" * 1_000_000}), FORM_HEADERS),  # a 1 MB field
        ("", FORM_HEADERS),  # nothing at all
        (_form_body({"client_id": "spa"}), FORM_HEADERS),  # no grant_type
    ],
)
def test_malformed_token_requests_are_400_and_append_nothing(
    live: LiveServer, body: str | bytes, headers: dict[str, str]
) -> None:
    response = live.post("/oauth/token", data=body, headers=headers)
    assert_oauth_error(response, 400, "invalid_request")
    assert live.events() == []


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _forgeries(live: LiveServer, genuine: str) -> dict[str, str]:
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    public = live.get("/.well-known/jwks.json").json()["keys"][0]
    public_raw = base64.urlsafe_b64decode(public["x"] + "==")
    stranger = Ed25519PrivateKey.generate()
    head, body, signature = genuine.split(".")
    now = int(live.clock.now().timestamp())
    return {
        "alg none": f"{_b64({**header, 'alg': 'none'})}.{body}.",
        "HS256 with the public key": jwt.encode(
            claims, public_raw, algorithm="HS256", headers={"kid": header["kid"], "typ": "at+jwt"}
        ),
        "unknown kid": jwt.encode(
            claims, stranger, algorithm="EdDSA", headers={"kid": "nope", "typ": "at+jwt"}
        ),
        "another key under our kid": jwt.encode(
            claims, stranger, algorithm="EdDSA", headers={"kid": header["kid"], "typ": "at+jwt"}
        ),
        "tampered payload": f"{head}.{_b64({**claims, 'sub': 'bob'})}.{signature}",
        "typ JWT": jwt.encode(
            claims, stranger, algorithm="EdDSA", headers={"kid": header["kid"], "typ": "JWT"}
        ),
        "expired": jwt.encode(
            {**claims, "exp": now - 1},
            stranger,
            algorithm="EdDSA",
            headers={"kid": header["kid"], "typ": "at+jwt"},
        ),
        "public key bytes": stranger.public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
        .hex(),
    }


def test_forged_access_tokens_are_refused(live: LiveServer) -> None:
    genuine = live.login()["access_token"]
    assert live.get("/sessions", headers=live.bearer(genuine)).status_code == 200
    for name, forged in _forgeries(live, genuine).items():
        response = live.get("/sessions", headers=live.bearer(forged))
        assert response.status_code == 401, name
        assert_invalid_token(response)
        assert introspect(live, forged) == {"active": False}, name


@pytest.mark.parametrize(
    "other", [{"issuer": "https://elsewhere.test"}, {"audience": "another-api"}]
)
def test_tokens_for_another_issuer_or_audience_are_refused(
    live_factory: Callable[..., LiveServer], other: dict[str, str]
) -> None:
    foreign = live_factory(**other).login()["access_token"]
    live = live_factory()
    # Same database, same signing key: only iss or aud tells them apart.
    assert_invalid_token(live.get("/sessions", headers=live.bearer(foreign)))
    assert introspect(live, foreign) == {"active": False}


def test_parallel_failed_logins_of_a_new_name_queue_and_lock_it(live: LiveServer) -> None:
    # A production-cost hash keeps every attempt's transaction open long enough to overlap.
    Accounts(live.pool).add_user("eve", "the real password")
    form = {"grant_type": "password", "client_id": "spa", "username": "eve", "password": "guess"}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [
            pool.submit(requests.post, f"{live.url}/oauth/token", data=form, timeout=60)
            for _ in range(8)
        ]
        responses = [f.result() for f in futures]
    assert {r.status_code for r in responses} == {400}
    assert {r.json()["error"] for r in responses} == {"invalid_grant"}
    events = live.events("principal:eve")
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    types = [e.type for e in events]
    assert types.count("LoginFailed") == 8
    assert types.count("PrincipalLocked") == 1


@pytest.mark.parametrize(
    "path",
    ["/audit/users/a%00b/sessions", "/audit/sessions/a%00b", "/audit/events?user=a%00b"],
)
def test_nul_in_a_path_or_query_is_400_not_500(live: LiveServer, path: str) -> None:
    assert_oauth_error(live.get(path), 400, "invalid_request")


def test_nul_in_form_or_json_fields_is_400_and_appends_nothing(live: LiveServer) -> None:
    form = {**LOGIN, "username": "a\x00b"}
    assert_oauth_error(live.post("/oauth/token", data=form), 400, "invalid_request")
    browser = live.post(
        "/browser/login",
        json={"username": "a\x00b", "password": "x", "client_id": "spa"},
        headers={"Origin": "https://ledger.test", "X-Requested-With": "test"},
    )
    assert_oauth_error(browser, 400, "invalid_request")
    assert live.events() == []
