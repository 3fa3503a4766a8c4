"""The client_credentials grant (RFC 6749 §4.4): a confidential client's own access token, holding
its client scopes, with no session and no refresh token; every grant is an event."""

from __future__ import annotations

import jwt
import pytest
from authlib.integrations.requests_client import OAuth2Session

from api.accounts import SESSIONS_READ_SCOPE, AccountError, Accounts
from tests.api.conftest import RS_SECRET, SECRET, LiveServer, add_resource_server
from tests.waiting import wait_until


@pytest.fixture
def rs(live: LiveServer) -> LiveServer:
    """The live server with `rs`, a resource server that follows the session-end feed."""
    add_resource_server(live.accounts, "other:thing")
    return live


def _grant(live: LiveServer, **form: str) -> dict[str, object]:
    response = live.post(
        "/oauth/token", data={"grant_type": "client_credentials", **form}, auth=("rs", RS_SECRET)
    )
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, object] = response.json()
    return body


def test_a_confidential_client_gets_a_token_of_its_own_without_a_session(rs: LiveServer) -> None:
    body = _grant(rs)
    assert "refresh_token" not in body  # RFC 6749 §4.4.3
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 15 * 60)
    assert body["scope"] == f"{SESSIONS_READ_SCOPE} other:thing"
    claims = jwt.decode(str(body["access_token"]), options={"verify_signature": False})
    assert (claims["sub"], claims["client_id"], claims["scope"]) == ("rs", "rs", body["scope"])
    assert "sid" not in claims
    assert jwt.get_unverified_header(str(body["access_token"]))["typ"] == "at+jwt"
    [granted] = rs.events("client:rs")
    assert granted.type == "ClientCredentialsGranted"
    assert granted.data["scope"] == [SESSIONS_READ_SCOPE, "other:thing"]
    assert granted.data["ip"] == "127.0.0.1"
    assert str(granted.data["user_agent"]).startswith("python-requests/")
    assert rs.events("session:") == []


def test_a_client_asks_for_some_of_its_scopes_and_no_others(rs: LiveServer) -> None:
    assert _grant(rs, scope=SESSIONS_READ_SCOPE)["scope"] == SESSIONS_READ_SCOPE
    response = rs.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "audit"},
        auth=("rs", RS_SECRET),
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_scope",
        "error_description": "scope 'audit' is not granted to this client",
    }


def test_a_client_without_the_grant_or_with_a_wrong_secret_is_refused(rs: LiveServer) -> None:
    form = {"grant_type": "client_credentials"}
    unauthorized = rs.post("/oauth/token", data=form, auth=("backend", SECRET))
    assert (unauthorized.status_code, unauthorized.json()["error"]) == (400, "unauthorized_client")
    wrong = rs.post("/oauth/token", data=form, auth=("rs", "not-the-secret"))
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    public = rs.post("/oauth/token", data={**form, "client_id": "spa"})
    assert (public.status_code, public.json()["error"]) == (400, "unauthorized_client")


def test_a_public_client_cannot_be_given_the_grant(accounts: Accounts) -> None:
    with pytest.raises(AccountError, match="only a confidential client may use"):
        accounts.add_client("rs-public", None, ("client_credentials",))


def test_a_clients_token_is_introspected_and_dies_with_its_client(rs: LiveServer) -> None:
    token = str(_grant(rs)["access_token"])

    def introspected() -> dict[str, object]:
        response = rs.post("/oauth/introspect", data={"token": token}, auth=("backend", SECRET))
        body: dict[str, object] = response.json()
        return body

    body = introspected()
    assert (body["active"], body["sub"], body["client_id"]) == (True, "rs", "rs")
    assert "sid" not in body
    with rs.pool.connection() as conn:
        conn.execute("DELETE FROM clients WHERE client_id = 'rs'")
    wait_until(lambda: introspected() == {"active": False}, timeout=10, what="the client's end")


def test_a_clients_token_opens_no_users_endpoint(rs: LiveServer) -> None:
    token = str(_grant(rs)["access_token"])
    response = rs.get("/sessions", headers=rs.bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_the_metadata_lists_the_grant(live: LiveServer) -> None:
    metadata = live.get("/.well-known/oauth-authorization-server").json()
    assert "client_credentials" in metadata["grant_types_supported"]


def test_authlib_fetches_a_client_credentials_token(rs: LiveServer) -> None:
    client = OAuth2Session(
        client_id="rs",
        client_secret=RS_SECRET,
        token_endpoint_auth_method="client_secret_basic",
        scope=SESSIONS_READ_SCOPE,
    )
    token = client.fetch_token(f"{rs.url}/oauth/token", grant_type="client_credentials")
    assert token["scope"] == SESSIONS_READ_SCOPE
    assert "refresh_token" not in token
