"""Revocation, introspection, metadata and the bearer-authenticated session endpoints."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import jwt
import requests

from api.keys import Sealer, rotate_keys
from api.sessions import RequestInfo, SessionService, end_user_sessions
from projections.session import Policy
from tests.api.conftest import SECRET, LiveServer
from tests.api.test_oauth import assert_oauth_error
from tests.waiting import wait_until


def introspect(live: LiveServer, token: str, **extra: str) -> dict[str, object]:
    response = live.post(
        "/oauth/introspect", data={"token": token, **extra}, auth=("backend", SECRET)
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, object] = response.json()
    return body


def assert_invalid_token(response: requests.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith('Bearer realm="session-ledger"')
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.json()["error"] == "invalid_token"


def test_introspection_describes_an_active_access_token(live: LiveServer) -> None:
    tokens = live.login(scope="profile email")
    body = introspect(live, tokens["access_token"])
    assert body["active"] is True
    assert body["token_type"] == "access_token"
    assert (body["sub"], body["client_id"], body["scope"]) == ("ada", "spa", "profile email")
    assert body["iss"] == "https://ledger.test"
    assert body["aud"] == "session-ledger"
    assert isinstance(body["exp"], int)
    assert isinstance(body["iat"], int)
    assert body["exp"] - body["iat"] == 15 * 60
    [started] = live.events("session:")
    assert body["sid"] == started.stream_id.removeprefix("session:")


def test_introspection_of_a_refresh_token(live: LiveServer) -> None:
    tokens = live.login()
    body = introspect(live, tokens["refresh_token"], token_type_hint="refresh_token")
    assert (body["active"], body["token_type"], body["sub"]) == (True, "refresh_token", "ada")
    live.refresh(tokens["refresh_token"])
    assert introspect(live, tokens["refresh_token"]) == {"active": False}


def test_introspection_says_inactive_once_the_session_is_revoked(live: LiveServer) -> None:
    tokens = live.login()
    revoked = live.post(
        "/oauth/revoke", data={"token": tokens["refresh_token"], "client_id": "spa"}
    )
    assert revoked.status_code == 200
    assert introspect(live, tokens["access_token"]) == {"active": False}
    ended = live.events("session:")[-1]
    assert (ended.type, ended.event.reason) == ("SessionEnded", "logout")  # type: ignore[attr-defined]


def test_introspection_says_inactive_for_an_idle_session_with_a_live_jwt(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(Policy(idle_timeout=timedelta(minutes=5)))
    tokens = live.login()
    live.clock.advance(timedelta(minutes=5))  # the access token (15 min) is still unexpired
    assert introspect(live, tokens["access_token"]) == {"active": False}


def test_introspection_needs_a_confidential_client(live: LiveServer) -> None:
    tokens = live.login()
    public = live.post(
        "/oauth/introspect", data={"token": tokens["access_token"], "client_id": "spa"}
    )
    assert_oauth_error(public, 401, "invalid_client")
    anonymous = live.post("/oauth/introspect", data={"token": tokens["access_token"]})
    assert_oauth_error(anonymous, 401, "invalid_client")


def test_revoking_an_access_token_ends_its_session(live: LiveServer) -> None:
    tokens = live.login()
    form = {"token": tokens["access_token"], "token_type_hint": "access_token", "client_id": "spa"}
    assert live.post("/oauth/revoke", data=form).status_code == 200
    assert_oauth_error(live.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    assert_invalid_token(live.get("/sessions", headers=live.bearer(tokens["access_token"])))


def test_revoking_an_unknown_token_is_200_and_appends_nothing(live: LiveServer) -> None:
    response = live.post("/oauth/revoke", data={"token": "no-such-token", "client_id": "spa"})
    assert response.status_code == 200
    assert live.types() == []


def test_another_clients_token_is_not_revoked(live: LiveServer) -> None:
    tokens = live.login()
    response = live.post(
        "/oauth/revoke", data={"token": tokens["refresh_token"]}, auth=("backend", SECRET)
    )
    assert response.status_code == 200
    assert live.types() == ["SessionStarted"]


def test_metadata_and_jwks(live: LiveServer) -> None:
    meta = live.get("/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == "https://ledger.test"
    assert meta["token_endpoint"] == "https://ledger.test/oauth/token"
    assert meta["jwks_uri"] == "https://ledger.test/.well-known/jwks.json"
    assert meta["session_ends_endpoint"] == "https://ledger.test/feeds/session-ends"
    assert set(meta["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "password",
        "client_credentials",
    }
    assert "client_secret_basic" in meta["token_endpoint_auth_methods_supported"]
    keys = live.get("/.well-known/jwks.json").json()["keys"]
    # The access-token key, and the Shared Signals events' key (RS256, the CAEP profile's).
    assert [(k["kty"], k.get("crv"), k["alg"]) for k in keys] == [
        ("OKP", "Ed25519", "EdDSA"),
        ("RSA", None, "RS256"),
    ]
    assert not any({"d", "p", "q"} & set(key) for key in keys)


def test_listing_shows_only_the_callers_active_sessions(live: LiveServer) -> None:
    first = live.login()
    live.clock.advance(timedelta(minutes=1))
    second = live.login(username="ada")
    live.login(username="bob")
    response = live.get("/sessions", headers=live.bearer(second["access_token"]))
    assert response.status_code == 200
    listed = response.json()["sessions"]
    assert len(listed) == 2
    assert [s["current"] for s in listed] == [True, False]
    assert {s["client_id"] for s in listed} == {"spa"}
    newest = listed[0]
    assert newest["idle_expires_at"].endswith("Z")
    assert set(newest) == {
        "id", "client_id", "started_at", "last_activity", "idle_expires_at",
        "absolute_expires_at", "ip", "user_agent", "current",
    }  # fmt: skip
    assert newest["ip"] == "127.0.0.1"
    del first


def test_ending_one_session_and_refusing_someone_elses(live: LiveServer) -> None:
    mine, other = live.login(), live.login()
    bobs = live.login(username="bob")
    listed = live.get("/sessions", headers=live.bearer(mine["access_token"])).json()["sessions"]
    other_id = next(s["id"] for s in listed if not s["current"])
    ended = live.delete(f"/sessions/{other_id}", headers=live.bearer(mine["access_token"]))
    assert ended.status_code == 204
    assert_oauth_error(live.refresh(other["refresh_token"]), 400, "invalid_grant")
    bob_listed = live.get("/sessions", headers=live.bearer(bobs["access_token"])).json()
    bob_id = bob_listed["sessions"][0]["id"]
    refused = live.delete(f"/sessions/{bob_id}", headers=live.bearer(mine["access_token"]))
    assert refused.status_code == 404
    assert live.refresh(bobs["refresh_token"]).status_code == 200


def test_ending_all_sessions(live: LiveServer) -> None:
    first, second = live.login(), live.login()
    bobs = live.login(username="bob")
    response = live.delete("/sessions", headers=live.bearer(first["access_token"]))
    assert response.status_code == 204
    for tokens in (first, second):
        assert_oauth_error(live.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    assert live.refresh(bobs["refresh_token"]).status_code == 200
    assert live.types().count("SessionEnded") == 2


def test_ending_all_sessions_goes_on_past_one_batch(live: LiveServer) -> None:
    for _ in range(5):
        live.login()
        live.clock.advance(timedelta(seconds=1))
    service: SessionService = live.app.state.service
    info = RequestInfo("end-all", "127.0.0.1", "test")
    ended = end_user_sessions(
        live.pool,
        "ada",
        "logout",
        clock=live.clock.now,
        policy=service.policy,
        info=info,
        batch_size=2,
    )
    assert ended == 5
    assert service.list_sessions("ada") == []
    assert live.types().count("SessionEnded") == 5


def test_bearer_endpoints_refuse_missing_and_bad_tokens(live: LiveServer) -> None:
    missing = live.get("/sessions")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_invalid_token(live.get("/sessions", headers={"Authorization": "Bearer not.a.jwt"}))
    tokens = live.login()
    live.clock.advance(timedelta(minutes=15))
    assert_invalid_token(live.get("/sessions", headers=live.bearer(tokens["access_token"])))


def _access_token_kids(live: LiveServer) -> set[str]:
    """The JWKS's EdDSA keys: the Shared Signals events' RS256 key stands apart."""
    keys = live.get("/.well-known/jwks.json").json()["keys"]
    return {k["kid"] for k in keys if k["alg"] == "EdDSA"}


def test_a_rotated_key_signs_new_tokens_at_once_while_old_tokens_still_verify(
    live: LiveServer,
) -> None:
    old = live.login()["access_token"]
    old_kid = jwt.get_unverified_header(old)["kid"]
    new_kid = rotate_keys(live.pool, Sealer(None), live.clock.now()).kid

    def published() -> bool:
        return _access_token_kids(live) == {old_kid, new_kid}

    # Announced by the database: no reload interval to wait out (it was a minute).
    wait_until(published, timeout=10, what="the running server to publish the new key")
    new = live.login()["access_token"]
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    for token in (old, new):
        assert live.get("/sessions", headers=live.bearer(token)).status_code == 200
    live.clock.advance(timedelta(minutes=16, seconds=1))  # the old key's tokens expired + margin
    assert _access_token_kids(live) == {new_kid}
