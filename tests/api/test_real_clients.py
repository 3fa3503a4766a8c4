"""Off-the-shelf OAuth and JWT clients work against the API unchanged."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import jwt
from authlib.integrations.requests_client import OAuth2Session

from tests.api.conftest import PASSWORD, SECRET, LiveServer

ACCESS_TOKEN_LIFETIME = 15 * 60


def test_authlib_logs_in_and_refreshes_when_the_token_expires(live: LiveServer) -> None:
    updates: list[dict[str, Any]] = []
    client = OAuth2Session(
        client_id="spa",
        token_endpoint_auth_method="none",
        token_endpoint=f"{live.url}/oauth/token",
        # Authlib reads the wall clock while the server's clock is the test's: a leeway of a whole
        # token lifetime makes Authlib treat every token as expired when the server does.
        leeway=ACCESS_TOKEN_LIFETIME + 60,
        update_token=lambda token, refresh_token=None, access_token=None: updates.append(token),
    )
    token = client.fetch_token(
        f"{live.url}/oauth/token", grant_type="password", username="ada", password=PASSWORD
    )
    assert token["token_type"] == "Bearer"
    live.clock.advance(timedelta(seconds=ACCESS_TOKEN_LIFETIME))  # the first token is now dead
    response = client.get(f"{live.url}/sessions", timeout=30)
    assert response.status_code == 200, response.text
    assert len(updates) == 1
    assert updates[0]["refresh_token"] != token["refresh_token"]
    assert live.types() == ["SessionStarted", "RefreshTokenRotated", "ActivityRecorded"]


def test_authlib_confidential_client_with_basic_auth(live: LiveServer) -> None:
    client = OAuth2Session(
        client_id="backend",
        client_secret=SECRET,
        token_endpoint_auth_method="client_secret_basic",
    )
    token = client.fetch_token(
        f"{live.url}/oauth/token", grant_type="password", username="ada", password=PASSWORD
    )
    refreshed = client.refresh_token(f"{live.url}/oauth/token", token["refresh_token"])
    assert refreshed["refresh_token"] != token["refresh_token"]
    client.revoke_token(f"{live.url}/oauth/revoke", refreshed["refresh_token"])
    assert live.types()[-1] == "SessionEnded"


def test_pyjwt_jwks_client_verifies_an_access_token(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory()
    access = live.login()["access_token"]
    metadata = live.get("/.well-known/oauth-authorization-server").json()
    jwks_uri = metadata["jwks_uri"].replace(metadata["issuer"], live.url)
    signing_key = jwt.PyJWKClient(jwks_uri).get_signing_key_from_jwt(access)
    claims = jwt.decode(
        access,
        signing_key,
        algorithms=["EdDSA"],
        audience="session-ledger",
        issuer=metadata["issuer"],
        options={"verify_exp": False},  # the server's clock is the test's, not the wall's
    )
    assert (claims["sub"], claims["client_id"]) == ("ada", "spa")
    assert jwt.get_unverified_header(access)["typ"] == "at+jwt"
