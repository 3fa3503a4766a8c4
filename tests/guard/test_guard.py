"""The resource-server guard against a live session server: local verification, and refusal of
an ended session's still-unexpired token within a second of the end, for every kind of end."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
import requests
from fastapi import Depends, FastAPI, Request
from session_ledger_guard import Guard, GuardMiddleware, Refused, claims_dependency

from api.sessions import RequestInfo
from api.users import UserChanges
from projections.sql.sweeper import ExpirySweeper
from tests.api.conftest import (
    PASSWORD,
    RS_SECRET,
    TEST_POLICY,
    DpopKey,
    LiveServer,
    add_resource_server,
    serve_in_thread,
    sid,
)
from tests.waiting import wait_until

AUDIENCE = "session-ledger"
LiveFactory = Callable[..., LiveServer]


@pytest.fixture
def server(live_factory: LiveFactory) -> LiveServer:
    """A session server whose issuer is its own URL, and the resource server's client."""
    live = live_factory(issuer=None)
    add_resource_server(live.accounts)
    return live


def _guard(live: LiveServer, **options: Any) -> Guard:
    return Guard(
        issuer=live.url,
        audience=AUDIENCE,
        client_id="rs",
        client_secret=RS_SECRET,
        clock=lambda: live.clock.now().timestamp(),
        **options,
    )


@pytest.fixture
def guard(server: LiveServer) -> Iterator[Guard]:
    with _guard(server) as started:
        wait_until(lambda: started.health()["connected"], timeout=10, what="the guard's feed")
        yield started


def _refused_within_a_second(guard: Guard, token: str) -> Refused:
    refusals: list[Refused] = []

    def refused() -> bool:
        try:
            guard.verify(token)
        except Refused as e:
            refusals.append(e)
            return True
        return False

    wait_until(refused, timeout=1.0, what="the guard to refuse the ended session's token")
    return refusals[-1]


def _logout(live: LiveServer, tokens: dict[str, Any]) -> None:
    live.delete(f"/sessions/{sid(tokens)}", headers=live.bearer(tokens["access_token"]))


def _logout_everywhere(live: LiveServer, tokens: dict[str, Any]) -> None:
    live.delete("/sessions", headers=live.bearer(tokens["access_token"]))


def _revoke(live: LiveServer, tokens: dict[str, Any]) -> None:
    live.post("/oauth/revoke", data={"token": tokens["refresh_token"], "client_id": "spa"})


def _reuse(live: LiveServer, tokens: dict[str, Any]) -> None:
    live.refresh(tokens["refresh_token"])
    live.clock.advance(TEST_POLICY.refresh_grace + timedelta(seconds=1))
    live.refresh(tokens["refresh_token"])


def _revoke_user(live: LiveServer, tokens: dict[str, Any], user: str = "ada") -> None:
    """`sessions revoke --user`, which needs no server: the ledger announces it anyway."""
    info = RequestInfo("test", None, None)
    changes = UserChanges(live.accounts, clock=live.clock.now, policy=TEST_POLICY, info=info)
    changes.revoke(user)


ENDS = {
    "logout": _logout,
    "logout everywhere": _logout_everywhere,
    "revocation": _revoke,
    "reuse detection": _reuse,
    "sessions revoke --user": _revoke_user,
}


@pytest.mark.parametrize("end", sorted(ENDS))
def test_an_ended_sessions_unexpired_token_is_refused_within_a_second(
    server: LiveServer, guard: Guard, end: str
) -> None:
    tokens = server.login()
    claims = guard.verify(tokens["access_token"])
    assert (claims["sub"], claims["sid"]) == ("ada", sid(tokens))
    ENDS[end](server, tokens)
    refused = _refused_within_a_second(guard, tokens["access_token"])
    assert (refused.status_code, refused.error) == (401, "invalid_token")
    assert refused.description == "the session has ended"
    assert refused.www_authenticate is not None
    assert refused.www_authenticate.startswith(
        'Bearer realm="session-ledger", error="invalid_token"'
    )
    other = server.login(username="bob")
    assert guard.verify(other["access_token"])["sub"] == "bob"  # another session is untouched


def test_an_idle_expiry_is_announced_by_the_sweeper_and_refused(
    live_factory: LiveFactory,
) -> None:
    policy = dataclasses.replace(TEST_POLICY, idle_timeout=timedelta(minutes=10))
    live = live_factory(issuer=None, policy=policy)
    add_resource_server(live.accounts)
    with _guard(live) as guard:
        tokens = live.login()
        guard.verify(tokens["access_token"])
        live.clock.advance(policy.idle_timeout)  # idle now; the token lives 5 minutes more
        assert ExpirySweeper(live.pool, clock=live.clock.now, policy=policy).sweep() == 1
        refused = _refused_within_a_second(guard, tokens["access_token"])
        assert refused.description == "the session has ended"


@pytest.mark.parametrize("other", [{"audience": "another-api"}, {"issuer": "https://else.example"}])
def test_tokens_for_another_audience_or_issuer_are_refused(
    server: LiveServer, guard: Guard, live_factory: LiveFactory, other: dict[str, str]
) -> None:
    elsewhere = live_factory(**other)  # the same database, so the same signing key
    token = elsewhere.login()["access_token"]
    with pytest.raises(Refused, match="token does not verify") as caught:
        guard.verify(token)
    assert caught.value.status_code == 401


def test_a_token_whose_alg_is_not_its_keys_or_typ_not_at_jwt_is_refused(
    server: LiveServer, guard: Guard
) -> None:
    token = server.login()["access_token"]
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    headers = {"kid": header["kid"], "typ": "at+jwt"}
    hs256 = jwt.encode(claims, "k" * 32, algorithm="HS256", headers=headers)
    with pytest.raises(Refused, match="the algorithm is not the key's"):
        guard.verify(hs256)
    id_token_typ = jwt.encode(claims, "k" * 32, algorithm="HS256", headers={"typ": "JWT"})
    with pytest.raises(Refused, match="typ"):
        guard.verify(id_token_typ)
    with pytest.raises(Refused, match="malformed"):
        guard.verify("not a token")


def test_an_expired_token_is_refused_by_the_guards_clock(server: LiveServer, guard: Guard) -> None:
    token = server.login()["access_token"]
    server.clock.advance(TEST_POLICY.access_token_ttl + timedelta(seconds=31))
    with pytest.raises(Refused, match="expired"):
        guard.verify(token)


def _stale(guard: Guard) -> bool:
    lag = guard.health()["lag_seconds"]
    return lag is not None and lag > guard.max_staleness


def test_a_stale_feed_fails_closed_with_503(server: LiveServer) -> None:
    with _guard(server, max_staleness=1.0) as guard:
        token = server.login()["access_token"]
        guard.verify(token)
        server.stop()  # the feed falls silent
        wait_until(lambda: _stale(guard), timeout=10, what="the feed to go stale")
        with pytest.raises(Refused) as caught:
            guard.verify(token)
    assert (caught.value.status_code, caught.value.error) == (503, "temporarily_unavailable")
    assert caught.value.www_authenticate is None


def test_a_stale_feed_with_fail_open_accepts_and_warns_on_every_request(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    with _guard(server, max_staleness=1.0, fail_open=True) as guard:
        token = server.login()["access_token"]
        server.stop()
        wait_until(lambda: _stale(guard), timeout=10, what="the feed to go stale")
        with caplog.at_level(logging.WARNING, logger="session_ledger_guard"):
            assert guard.verify(token)["sub"] == "ada"
            assert guard.verify(token)["sub"] == "ada"
    warnings = [r for r in caplog.records if "fail_open" in r.getMessage()]
    assert len(warnings) == 2


def test_the_guard_resumes_from_its_cursor_after_the_server_went_away(
    live_factory: LiveFactory,
) -> None:
    first = live_factory(issuer=None)
    add_resource_server(first.accounts)
    port = int(first.url.rsplit(":", 1)[1])
    with _guard(first, max_staleness=60.0) as guard:
        seen = first.login()
        _logout(first, seen)
        _refused_within_a_second(guard, seen["access_token"])
        cursor = guard.health()["cursor"]
        missed = first.login(username="bob")
        first.stop()
        wait_until(lambda: not guard.health()["connected"], timeout=10, what="the feed's loss")
        _revoke_user(first, missed, "bob")  # while no server is up
        second = live_factory(issuer=first.url, port=port)
        wait_until(lambda: guard.health()["connected"], timeout=15, what="the feed's return")
        refused = _refused_within_a_second(guard, missed["access_token"])
        assert refused.description == "the session has ended"
        assert guard.health()["cursor"] != cursor
        assert guard.verify(second.login()["access_token"])["sub"] == "ada"


def test_health_reports_the_feed(server: LiveServer, guard: Guard) -> None:
    _logout(server, server.login())
    wait_until(lambda: guard.health()["ended_sessions"] == 1, timeout=5, what="one end")
    health = guard.health()
    assert health["connected"] is True
    assert isinstance(health["cursor"], str)
    assert 0 <= health["lag_seconds"] < 5


# -- in a resource server -----------------------------------------------------------------------


def _orders_api() -> FastAPI:
    """A resource server's one route, answering with the user its guard found."""
    api = FastAPI()

    @api.get("/orders")
    async def orders(request: Request) -> dict[str, Any]:
        return {"user": request.state.claims["sub"]}

    return api


def test_a_fastapi_resource_server_refuses_an_ended_sessions_token(
    server: LiveServer, guard: Guard
) -> None:
    api = _orders_api()

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return guard.health()

    url, stop = serve_in_thread(GuardMiddleware(api, guard=guard, exempt={"/healthz"}))
    try:
        tokens = server.login()
        headers = server.bearer(tokens["access_token"])
        assert requests.get(f"{url}/orders", headers=headers, timeout=10).json() == {"user": "ada"}
        _logout(server, tokens)
        wait_until(
            lambda: requests.get(f"{url}/orders", headers=headers, timeout=10).status_code == 401,
            timeout=1.0,
            what="the resource server to refuse the token",
        )
        refused = requests.get(f"{url}/orders", headers=headers, timeout=10)
        assert refused.json() == {
            "error": "invalid_token",
            "error_description": "the session has ended",
        }
        assert refused.headers["Cache-Control"] == "no-store"
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
        anonymous = requests.get(f"{url}/orders", timeout=10)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="session-ledger"'
        assert requests.get(f"{url}/healthz", timeout=10).json()["connected"] is True
    finally:
        stop()


def test_the_fastapi_dependency_answers_as_rfc_6750_says(server: LiveServer, guard: Guard) -> None:
    api = FastAPI()
    profile = claims_dependency(guard, "profile")

    @api.get("/me")
    # A default, not Annotated: this module's annotations are strings, and `profile` is local.
    async def me(claims: dict[str, Any] = Depends(profile)) -> Any:  # noqa: B008
        return {"user": claims["sub"]}

    url, stop = serve_in_thread(api)
    try:
        token = server.login(scope="profile")["access_token"]
        ok = requests.get(f"{url}/me", headers=server.bearer(token), timeout=10)
        assert ok.json() == {"user": "ada"}
        narrow = server.login(scope="email")["access_token"]
        forbidden = requests.get(f"{url}/me", headers=server.bearer(narrow), timeout=10)
        assert forbidden.status_code == 403
        assert 'error="insufficient_scope"' in forbidden.headers["WWW-Authenticate"]
    finally:
        stop()


def test_a_callers_http_client_stays_open_after_close(server: LiveServer) -> None:
    with httpx.Client(timeout=10) as http:
        _guard(server, http=http).start().close()
        assert not http.is_closed
        assert http.get(f"{server.url}/healthz").status_code == 200


# DPoP-bound tokens (RFC 9449 §7).

API = "https://api.example.test"


def _bound(server: LiveServer) -> tuple[DpopKey, str]:
    """A login bound to a fresh key, and its access token."""
    key = DpopKey(server.clock, server.url)
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    response = server.post(
        "/oauth/token", data=form, headers={"DPoP": key.proof("POST", "/oauth/token")}
    )
    assert response.json()["token_type"] == "DPoP", response.text
    key.base = API  # from here on, proofs for the resource server
    return key, str(response.json()["access_token"])


def _dpop(guard: Guard, token: str, proof: str | None, path: str = "/orders") -> dict[str, Any]:
    return guard.verify_request(f"DPoP {token}", method="GET", url=f"{API}{path}?q=1", dpop=proof)


def test_the_guard_accepts_a_bound_token_with_its_proof(server: LiveServer, guard: Guard) -> None:
    key, token = _bound(server)
    claims = _dpop(guard, token, key.proof("GET", "/orders", token))
    assert claims["cnf"] == {"jkt": key.jkt}


def test_the_guard_refuses_a_bound_token_as_bearer_or_with_a_bad_proof(
    server: LiveServer, guard: Guard
) -> None:
    key, token = _bound(server)
    replayed = key.proof("GET", "/orders", token)
    _dpop(guard, token, replayed)
    other_key = DpopKey(server.clock, API)
    refusals: dict[str, Callable[[], object]] = {
        "as Bearer": lambda: guard.verify_request(f"Bearer {token}", method="GET", url=API),
        "verify()": lambda: guard.verify(token),
        "no proof": lambda: _dpop(guard, token, None),
        "wrong ath": lambda: _dpop(guard, token, key.proof("GET", "/orders", "another token")),
        "replayed": lambda: _dpop(guard, token, replayed),
        "another URL": lambda: _dpop(guard, token, key.proof("GET", "/admin", token)),
        "another method": lambda: _dpop(guard, token, key.proof("POST", "/orders", token)),
        "another key": lambda: _dpop(guard, token, other_key.proof("GET", "/orders", token)),
    }
    for name, attempt in refusals.items():
        with pytest.raises(Refused) as caught:
            attempt()
        assert caught.value.status_code == 401, name
        assert caught.value.www_authenticate is not None
        assert caught.value.www_authenticate.startswith('DPoP realm="session-ledger", error="'), (
            name
        )


def test_a_bearer_token_cannot_pose_as_a_dpop_one_at_the_guard(
    server: LiveServer, guard: Guard
) -> None:
    token = server.login()["access_token"]
    key = DpopKey(server.clock, API)
    with pytest.raises(Refused) as caught:
        _dpop(guard, token, key.proof("GET", "/orders", token))
    assert caught.value.error == "invalid_token"


def test_the_middleware_checks_a_proof_against_the_url_it_was_sent_to(
    server: LiveServer, guard: Guard
) -> None:
    api = _orders_api()

    url, stop = serve_in_thread(GuardMiddleware(api, guard=guard))
    try:
        key, token = _bound(server)
        key.base = url
        headers = {"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", "/orders", token)}
        assert requests.get(f"{url}/orders", headers=headers, timeout=10).json() == {"user": "ada"}
        again = requests.get(f"{url}/orders", headers=headers, timeout=10)
        assert again.status_code == 401
        assert again.headers["WWW-Authenticate"].startswith('DPoP realm="session-ledger"')
    finally:
        stop()
