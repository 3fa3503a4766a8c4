"""DPoP over HTTP (RFC 9449): a login with a proof binds the session, its refreshes need that
key, its access tokens the DPoP scheme with a proof; refusals are recorded and leave the session
to its owner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
import requests
from psycopg_pool import ConnectionPool

from projections.sql.runner import Runner
from tests.api.conftest import PASSWORD, SECRET, DpopKey, LiveServer

ISSUER = "https://ledger.test"  # the live server's: proofs name it in htu


def _login(live: LiveServer, key: DpopKey | None) -> requests.Response:
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    headers = {} if key is None else {"DPoP": key.proof("POST", "/oauth/token")}
    return live.post("/oauth/token", data=form, headers=headers)


def _refresh(live: LiveServer, token: str, proof: str | None) -> requests.Response:
    form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": token}
    return live.post("/oauth/token", data=form, headers={} if proof is None else {"DPoP": proof})


def _bound_login(live: LiveServer, key: DpopKey) -> dict[str, Any]:
    response = _login(live, key)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_login_with_a_proof_gives_a_dpop_token_bound_to_the_key(live: LiveServer) -> None:
    key = DpopKey(live.clock, ISSUER)
    body = _bound_login(live, key)
    assert body["token_type"] == "DPoP"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": key.jkt}
    (started,) = [e for e in live.events("session:") if e.type == "SessionStarted"]
    assert started.data["jkt"] == key.jkt


def test_a_login_without_a_proof_stays_a_bearer_session(live: LiveServer) -> None:
    body = _login(live, None).json()
    assert body["token_type"] == "Bearer"
    assert "cnf" not in jwt.decode(body["access_token"], options={"verify_signature": False})
    refreshed = _refresh(live, body["refresh_token"], None)
    assert refreshed.status_code == 200, refreshed.text


def test_a_bound_refresh_without_the_keys_proof_is_refused_recorded_and_harmless(
    live: LiveServer,
) -> None:
    key, thief = DpopKey(live.clock, ISSUER), DpopKey(live.clock, ISSUER)
    tokens = _bound_login(live, key)
    missing = _refresh(live, tokens["refresh_token"], None)
    other = _refresh(live, tokens["refresh_token"], thief.proof("POST", "/oauth/token"))
    for refused in (missing, other):
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_dpop_proof"
        assert refused.headers["Cache-Control"] == "no-store"
    attempts = [e for e in live.events("session:") if e.type == "DpopProofRefused"]
    assert [(e.data["reason"], e.data["jkt"]) for e in attempts] == [
        ("missing", None),
        ("another_key", thief.jkt),
    ]
    assert all(e.data["ip"] == "127.0.0.1" for e in attempts)
    # The owner goes on: the refusals ended nothing.
    owner = _refresh(live, tokens["refresh_token"], key.proof("POST", "/oauth/token"))
    assert owner.status_code == 200, owner.text
    assert owner.json()["token_type"] == "DPoP"


def test_a_mismatch_ends_the_session_when_configured(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(dpop_mismatch_revokes=True)
    key = DpopKey(live.clock, ISSUER)
    tokens = _bound_login(live, key)
    assert _refresh(live, tokens["refresh_token"], None).status_code == 400
    owner = _refresh(live, tokens["refresh_token"], key.proof("POST", "/oauth/token"))
    assert owner.status_code == 400
    assert owner.json()["error"] == "invalid_grant"
    (ended,) = [e for e in live.events("session:") if e.type == "SessionEnded"]
    assert ended.data["reason"] == "dpop_refused"


def test_with_server_nonces_a_proof_without_one_is_told_the_nonce_to_use(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(dpop_nonce=True)
    key = DpopKey(live.clock, ISSUER)
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    first = live.post(
        "/oauth/token", data=form, headers={"DPoP": key.proof("POST", "/oauth/token")}
    )
    assert first.status_code == 400
    assert first.json()["error"] == "use_dpop_nonce"
    nonce = first.headers["DPoP-Nonce"]
    retried = live.post(
        "/oauth/token", data=form, headers={"DPoP": key.proof("POST", "/oauth/token", nonce=nonce)}
    )
    assert retried.status_code == 200, retried.text
    assert retried.json()["token_type"] == "DPoP"
    assert retried.headers["DPoP-Nonce"]  # the next one to use
    live.clock.advance(timedelta(minutes=2))  # the nonce's slot and the next are over
    stale = key.proof("POST", "/oauth/token", nonce=nonce)
    refreshed = _refresh(live, retried.json()["refresh_token"], stale)
    assert refreshed.json()["error"] == "use_dpop_nonce"
    assert refreshed.headers["DPoP-Nonce"] not in (nonce, retried.headers["DPoP-Nonce"])


def test_a_proof_presented_twice_is_refused_the_second_time(live: LiveServer) -> None:
    key = DpopKey(live.clock, ISSUER)
    tokens = _bound_login(live, key)
    proof = key.proof("POST", "/oauth/token")
    assert _refresh(live, tokens["refresh_token"], proof).status_code == 200
    again = _refresh(live, tokens["refresh_token"], proof)
    assert again.status_code == 400
    assert "presented before" in again.json()["error_description"]


def test_the_same_proof_at_two_workers_at_once_is_taken_by_one(
    live: LiveServer, live_factory: Callable[..., LiveServer]
) -> None:
    other = live_factory()  # a second server on the same database, as a second worker
    key = DpopKey(live.clock, ISSUER)
    proof = key.proof("POST", "/oauth/token")
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def send(server: LiveServer) -> None:
        barrier.wait(10)
        statuses.append(server.post("/oauth/token", data=form, headers={"DPoP": proof}).status_code)

    threads = [threading.Thread(target=send, args=(s,)) for s in (live, other, live, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200, 400, 400, 400]


def test_one_refresh_proof_at_two_workers_at_once_rotates_once(
    live: LiveServer, live_factory: Callable[..., LiveServer]
) -> None:
    """A refresh takes its proof in its own transaction, before the session's row lock: the
    copies wait for the first's commit, then find the proof used; none deadlocks, none is
    mistaken for refresh-token reuse."""
    other = live_factory()
    key = DpopKey(live.clock, ISSUER)
    token = _bound_login(live, key)["refresh_token"]
    proof = key.proof("POST", "/oauth/token")
    answers: list[requests.Response] = []
    barrier = threading.Barrier(4)

    def send(server: LiveServer) -> None:
        barrier.wait(10)
        answers.append(_refresh(server, token, proof))

    threads = [threading.Thread(target=send, args=(s,)) for s in (live, other, live, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(a.status_code for a in answers) == [200, 400, 400, 400]
    refused = [a.json()["error_description"] for a in answers if a.status_code == 400]
    assert all("presented before" in text for text in refused), refused
    assert live.types().count("RefreshTokenRotated") == 1
    assert "RefreshTokenReuseDetected" not in live.types()


def test_a_refresh_refused_before_it_rotates_leaves_its_proof_unused(live: LiveServer) -> None:
    live.accounts.add_client("other-spa", None, ("password", "refresh_token"))
    key = DpopKey(live.clock, ISSUER)
    token = _bound_login(live, key)["refresh_token"]
    proof = key.proof("POST", "/oauth/token")
    form = {"grant_type": "refresh_token", "client_id": "other-spa", "refresh_token": token}
    foreign = live.post("/oauth/token", data=form, headers={"DPoP": proof})
    assert foreign.json()["error"] == "invalid_grant"  # refused in the refresh's transaction
    assert _refresh(live, token, proof).status_code == 200


@pytest.mark.parametrize(("method", "path"), [("GET", "/oauth/token"), ("POST", "/oauth/revoke")])
def test_a_proof_for_another_method_or_uri_is_refused(
    live: LiveServer, method: str, path: str
) -> None:
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    response = live.post(
        "/oauth/token", data=form, headers={"DPoP": DpopKey(live.clock, ISSUER).proof(method, path)}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_dpop_proof"


def test_a_malformed_proof_or_two_of_them_are_refused(live: LiveServer) -> None:
    assert _login_with(live, [("DPoP", "not-a-jwt")]).status_code == 400
    key = DpopKey(live.clock, ISSUER)
    two = [("DPoP", key.proof("POST", "/oauth/token")), ("DPoP", key.proof("POST", "/oauth/token"))]
    response = _login_with(live, two)
    assert response.status_code == 400
    assert "at most one DPoP header" in response.json()["error_description"]


def _login_with(live: LiveServer, headers: list[tuple[str, str]]) -> httpx.Response:
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    return httpx.post(f"{live.url}/oauth/token", data=form, headers=headers, timeout=30)


def test_a_bound_access_token_needs_the_dpop_scheme_and_a_proof_at_the_api(
    live: LiveServer,
) -> None:
    key = DpopKey(live.clock, ISSUER)
    access = _bound_login(live, key)["access_token"]
    as_bearer = live.get("/sessions", headers={"Authorization": f"Bearer {access}"})
    assert as_bearer.status_code == 401
    assert as_bearer.headers["WWW-Authenticate"].startswith(
        'DPoP realm="session-ledger", error="invalid_token"'
    )
    proven = live.get(
        "/sessions",
        headers={"Authorization": f"DPoP {access}", "DPoP": key.proof("GET", "/sessions", access)},
    )
    assert proven.status_code == 200, proven.text
    no_proof = live.get("/sessions", headers={"Authorization": f"DPoP {access}"})
    no_ath = live.get(
        "/sessions",
        headers={"Authorization": f"DPoP {access}", "DPoP": key.proof("GET", "/sessions")},
    )
    thief = live.get(
        "/sessions",
        headers={
            "Authorization": f"DPoP {access}",
            "DPoP": DpopKey(live.clock, ISSUER).proof("GET", "/sessions", access),
        },
    )
    for refused, error in (
        (no_proof, "invalid_dpop_proof"),
        (no_ath, "invalid_dpop_proof"),
        (thief, "invalid_token"),
    ):
        assert refused.status_code == 401, refused.text
        assert refused.headers["WWW-Authenticate"].startswith(
            f'DPoP realm="session-ledger", error="{error}"'
        )


def test_a_bearer_token_cannot_pose_as_a_dpop_one(live: LiveServer) -> None:
    access = _login(live, None).json()["access_token"]
    key = DpopKey(live.clock, ISSUER)
    response = live.get(
        "/sessions",
        headers={"Authorization": f"DPoP {access}", "DPoP": key.proof("GET", "/sessions", access)},
    )
    assert response.status_code == 401
    assert "not DPoP-bound" in response.json()["error_description"]


def test_introspection_shows_the_key_and_the_dpop_type(live: LiveServer) -> None:
    key = DpopKey(live.clock, ISSUER)
    access = _bound_login(live, key)["access_token"]
    body = live.post("/oauth/introspect", data={"token": access}, auth=("backend", SECRET)).json()
    assert body["active"] is True
    assert body["token_type"] == "DPoP"
    assert body["cnf"] == {"jkt": key.jkt}


def test_the_metadata_lists_the_proof_algorithms(live: LiveServer) -> None:
    meta = live.get("/.well-known/oauth-authorization-server").json()
    assert meta["dpop_signing_alg_values_supported"] == ["ES256", "EdDSA"]


def _revoke(live: LiveServer, token: str, proof: str | None) -> requests.Response:
    form = {"client_id": "spa", "token": token}
    return live.post("/oauth/revoke", data=form, headers={} if proof is None else {"DPoP": proof})


def test_a_bound_session_is_revoked_only_with_its_keys_proof(live: LiveServer) -> None:
    key, thief = DpopKey(live.clock, ISSUER), DpopKey(live.clock, ISSUER)
    tokens = _bound_login(live, key)
    for token in (tokens["refresh_token"], tokens["access_token"]):
        for proof in (None, thief.proof("POST", "/oauth/revoke")):
            refused = _revoke(live, token, proof)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == "invalid_dpop_proof"
    attempts = [e.data["reason"] for e in live.events("session:") if e.type == "DpopProofRefused"]
    assert attempts == ["missing", "another_key"] * 2
    assert "SessionEnded" not in live.types()
    revoked = _revoke(live, tokens["refresh_token"], key.proof("POST", "/oauth/revoke"))
    assert revoked.status_code == 200, revoked.text
    (ended,) = [e for e in live.events("session:") if e.type == "SessionEnded"]
    assert ended.data["reason"] == "logout"
    # Once the session is over, its token is as good as unknown (RFC 7009 §2.2): 200.
    assert _revoke(live, tokens["refresh_token"], None).status_code == 200


def test_an_unbound_session_is_revoked_without_a_proof(live: LiveServer) -> None:
    tokens = _login(live, None).json()
    assert _revoke(live, tokens["refresh_token"], None).status_code == 200
    assert live.types()[-1] == "SessionEnded"


BROWSER = {"Origin": ISSUER, "X-Requested-With": "test"}
COOKIE = "__Host-ledger-refresh"


def _browser(
    live: LiveServer, path: str, body: dict[str, str], cookie: str | None, proof: str | None
) -> requests.Response:
    headers = dict(BROWSER)
    if cookie is not None:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    if proof is not None:
        headers["DPoP"] = proof
    return requests.post(live.url + path, json=body, headers=headers, timeout=30)


def test_browser_mode_binds_the_cookie_to_the_key(live: LiveServer) -> None:
    key, thief = DpopKey(live.clock, ISSUER), DpopKey(live.clock, ISSUER)
    ada = {"username": "ada", "password": PASSWORD, "client_id": "spa"}
    login = _browser(live, "/browser/login", ada, None, key.proof("POST", "/browser/login"))
    assert login.status_code == 200, login.text
    assert login.json()["token_type"] == "DPoP"
    cookie = login.cookies[COOKIE]
    spa = {"client_id": "spa"}
    for proof in (None, thief.proof("POST", "/browser/refresh")):
        refused = _browser(live, "/browser/refresh", spa, cookie, proof)
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_dpop_proof"
        assert "set-cookie" not in refused.headers  # the owner's cookie is still good
    out = _browser(live, "/browser/logout", spa, cookie, None)
    assert out.status_code == 400
    assert out.json()["error"] == "invalid_dpop_proof"
    refreshed = _browser(
        live, "/browser/refresh", spa, cookie, key.proof("POST", "/browser/refresh")
    )
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["token_type"] == "DPoP"
    attempts = [e.data["reason"] for e in live.events("session:") if e.type == "DpopProofRefused"]
    assert attempts == ["missing", "another_key", "missing"]
    cookie = refreshed.cookies[COOKIE]
    out = _browser(live, "/browser/logout", spa, cookie, key.proof("POST", "/browser/logout"))
    assert out.status_code == 204
    assert live.types()[-1] == "SessionEnded"


def test_browser_mode_asks_for_the_servers_nonce_when_nonces_are_on(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(dpop_nonce=True)
    key = DpopKey(live.clock, ISSUER)
    ada = {"username": "ada", "password": PASSWORD, "client_id": "spa"}
    first = _browser(live, "/browser/login", ada, None, key.proof("POST", "/browser/login"))
    assert first.status_code == 400
    assert first.json()["error"] == "use_dpop_nonce"
    nonce = first.headers["DPoP-Nonce"]
    proof = key.proof("POST", "/browser/login", nonce=nonce)
    retried = _browser(live, "/browser/login", ada, None, proof)
    assert retried.status_code == 200, retried.text
    assert retried.headers["DPoP-Nonce"]


def test_refused_proofs_are_alerts_for_the_auditors(live: LiveServer, pool: ConnectionPool) -> None:
    live.accounts.add_user("sec", PASSWORD, ("audit",))
    auditor = live.bearer(live.login(username="sec", scope="audit")["access_token"])
    key, thief = DpopKey(live.clock, ISSUER), DpopKey(live.clock, ISSUER)
    tokens = _bound_login(live, key)
    refused = live.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "client_id": "spa",
            "refresh_token": tokens["refresh_token"],
        },
        headers={"DPoP": thief.proof("POST", "/oauth/token"), "User-Agent": "thief/1.0"},
    )
    assert refused.status_code == 400
    Runner(live.settings.database_url or "", pool).run_once()
    (alert,) = live.get("/audit/alerts", headers=auditor).json()["alerts"]
    assert (alert["kind"], alert["user_name"], alert["ip"]) == ("dpop_refused", "ada", "127.0.0.1")
    sid = jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"]
    assert alert["session_id"] == sid
    assert alert["details"] == {
        "reason": "another_key",
        "jkt": thief.jkt,
        "user_agent": "thief/1.0",
    }


def test_a_client_that_requires_dpop_gets_no_token_without_a_proof(live: LiveServer) -> None:
    live.accounts.add_client("strict", None, ("password", "refresh_token"), dpop_bound=True)
    form = {"grant_type": "password", "client_id": "strict", "username": "ada"}
    form["password"] = PASSWORD
    refused = live.post("/oauth/token", data=form)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_dpop_proof"
    assert "must send a DPoP proof" in refused.json()["error_description"]
    browser = _browser(live, "/browser/login", {**form, "client_id": "strict"}, None, None)
    assert browser.json()["error"] == "invalid_dpop_proof"
    assert "SessionStarted" not in live.types()
    key = DpopKey(live.clock, ISSUER)
    granted = live.post(
        "/oauth/token", data=form, headers={"DPoP": key.proof("POST", "/oauth/token")}
    )
    assert granted.status_code == 200, granted.text
    assert granted.json()["token_type"] == "DPoP"


def test_a_client_credentials_request_with_a_proof_gets_a_bound_token(live: LiveServer) -> None:
    live.accounts.add_client("worker", SECRET, ("client_credentials",))
    key = DpopKey(live.clock, ISSUER)
    form = {"grant_type": "client_credentials"}
    bearer = live.post("/oauth/token", data=form, auth=("worker", SECRET)).json()
    assert bearer["token_type"] == "Bearer"
    bound = live.post(
        "/oauth/token",
        data=form,
        auth=("worker", SECRET),
        headers={"DPoP": key.proof("POST", "/oauth/token")},
    ).json()
    assert bound["token_type"] == "DPoP"
    claims = jwt.decode(bound["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": key.jkt}
    introspected = live.post(
        "/oauth/introspect", data={"token": bound["access_token"]}, auth=("backend", SECRET)
    ).json()
    assert (introspected["token_type"], introspected["cnf"]) == ("DPoP", {"jkt": key.jkt})
