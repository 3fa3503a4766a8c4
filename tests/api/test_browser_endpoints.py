"""Browser mode over plain HTTP: the refresh cookie's flags, the CSRF defence, and the same ledger
rules as /oauth/token (rotation, grace, reuse detection, expiry), with the events they append."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from http.cookies import Morsel, SimpleCookie
from typing import Any

import pytest
import requests

from api.http.browser import COOKIE_PATH, REFRESH_COOKIE
from tests.api.conftest import PASSWORD, LiveServer
from tests.api.test_oauth import assert_oauth_error
from tests.api.test_serve import serving

ORIGIN = "https://ledger.test"  # the issuer's origin, which live servers accept by default
HEADERS = {"Origin": ORIGIN, "X-Requested-With": "test"}
ADA = {"username": "ada", "password": PASSWORD, "client_id": "spa"}
SPA = {"client_id": "spa"}


def browser_post(
    live: LiveServer,
    path: str,
    body: object,
    cookie: str | None = None,
    headers: dict[str, str] = HEADERS,
) -> requests.Response:
    """A POST as the page would send it; no cookie jar, so each cookie is sent on purpose."""
    extra = {} if cookie is None else {"Cookie": f"{REFRESH_COOKIE}={cookie}"}
    return requests.post(live.url + path, json=body, headers={**headers, **extra}, timeout=30)


def set_cookie(response: requests.Response) -> Morsel[str]:
    jar: SimpleCookie = SimpleCookie()
    jar.load(response.headers["set-cookie"])
    return jar[REFRESH_COOKIE]


def assert_cleared(response: requests.Response) -> None:
    morsel = set_cookie(response)
    assert morsel.value == ""
    assert morsel["max-age"] == "0"
    assert (morsel["path"], morsel["secure"], morsel["httponly"]) == (COOKIE_PATH, True, True)


def login(live: LiveServer) -> tuple[dict[str, Any], str]:
    response = browser_post(live, "/browser/login", ADA)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body, set_cookie(response).value


def test_login_sets_the_refresh_token_only_as_a_locked_down_cookie(live: LiveServer) -> None:
    response = browser_post(live, "/browser/login", ADA)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "idle_timeout"}
    assert (body["token_type"], body["expires_in"], body["idle_timeout"]) == ("Bearer", 900, 1800)
    cookie = set_cookie(response)
    assert cookie.key.startswith("__Host-")
    assert (cookie["secure"], cookie["httponly"], cookie["samesite"]) == (True, True, "strict")
    assert cookie["path"] == "/"
    assert not cookie["domain"]
    assert cookie["max-age"] == str(2 * 3600)  # the session's absolute lifetime
    assert cookie.value not in response.text
    [started] = live.events("session:")
    assert started.type == "SessionStarted"
    assert cookie.value not in started.data_json
    sessions = live.get("/sessions", headers=live.bearer(body["access_token"]))
    assert sessions.status_code == 200, sessions.text


def test_refresh_rotates_the_cookie_and_returns_a_new_access_token(live: LiveServer) -> None:
    first, cookie = login(live)
    live.clock.advance(timedelta(minutes=20))
    response = browser_post(live, "/browser/refresh", SPA, cookie)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert "refresh_token" not in response.json()
    assert response.json()["access_token"] != first["access_token"]
    rotated = set_cookie(response)
    assert rotated.value != cookie
    assert rotated["max-age"] == str(100 * 60)  # never beyond the session's absolute end
    assert live.types() == ["SessionStarted", "RefreshTokenRotated", "ActivityRecorded"]


def test_a_retry_in_the_grace_window_gets_the_same_cookie(live: LiveServer) -> None:
    _, cookie = login(live)
    first = set_cookie(browser_post(live, "/browser/refresh", SPA, cookie)).value
    live.clock.advance(timedelta(seconds=10))
    retry = browser_post(live, "/browser/refresh", SPA, cookie)
    assert retry.status_code == 200, retry.text
    assert set_cookie(retry).value == first
    assert live.types() == ["SessionStarted", "RefreshTokenRotated", "RefreshTokenRetried"]


def test_reuse_after_the_grace_window_revokes_the_session_and_clears_the_cookie(
    live: LiveServer,
) -> None:
    _, cookie = login(live)
    newest = set_cookie(browser_post(live, "/browser/refresh", SPA, cookie)).value
    live.clock.advance(timedelta(seconds=11))
    stolen = browser_post(live, "/browser/refresh", SPA, cookie)
    assert_oauth_error(stolen, 400, "invalid_grant")
    assert_cleared(stolen)
    assert live.types()[-2:] == ["RefreshTokenReuseDetected", "SessionEnded"]
    # The holder of the newest token learns why, too: the page can tell its user.
    legitimate = browser_post(live, "/browser/refresh", SPA, newest)
    assert_oauth_error(legitimate, 400, "invalid_grant")
    assert "reuse" in legitimate.json()["error_description"]
    assert_cleared(legitimate)


def test_idle_expiry_refuses_the_refresh_and_clears_the_cookie(live: LiveServer) -> None:
    _, cookie = login(live)
    live.clock.advance(timedelta(minutes=30))
    response = browser_post(live, "/browser/refresh", SPA, cookie)
    assert_oauth_error(response, 400, "invalid_grant")
    assert "inactivity" in response.json()["error_description"]
    assert_cleared(response)
    ended = live.events("session:")[-1]
    assert ended.event.reason == "idle_timeout"  # type: ignore[attr-defined]


def test_logout_ends_the_session_and_clears_the_cookie(live: LiveServer) -> None:
    _, cookie = login(live)
    response = browser_post(live, "/browser/logout", SPA, cookie)
    assert response.status_code == 204, response.text
    assert response.headers["cache-control"] == "no-store"
    assert_cleared(response)
    assert live.types() == ["SessionStarted", "SessionEnded"]
    assert live.events("session:")[-1].event.reason == "logout"  # type: ignore[attr-defined]
    assert_oauth_error(browser_post(live, "/browser/refresh", SPA, cookie), 400, "invalid_grant")


def test_logout_without_a_cookie_only_clears_it(live: LiveServer) -> None:
    response = browser_post(live, "/browser/logout", SPA)
    assert response.status_code == 204, response.text
    assert_cleared(response)
    assert live.events() == []


def test_refresh_without_a_cookie_is_refused(live: LiveServer) -> None:
    response = browser_post(live, "/browser/refresh", SPA)
    assert_oauth_error(response, 400, "invalid_grant")
    assert "cookie" in response.json()["error_description"]


REFUSED = [
    pytest.param({"X-Requested-With": "x"}, "origin", None, id="no-origin"),
    pytest.param(
        {**HEADERS, "Origin": "https://evil.test"}, "origin", "https://evil.test", id="foreign"
    ),
    pytest.param({**HEADERS, "Origin": "null"}, "origin", "null", id="opaque-origin"),
    pytest.param(
        {**HEADERS, "Origin": "http://ledger.test"}, "origin", "http://ledger.test", id="http"
    ),
    pytest.param({"Origin": ORIGIN}, "header", ORIGIN, id="no-custom-header"),
    pytest.param({**HEADERS, "X-Requested-With": ""}, "header", ORIGIN, id="blank-header"),
]


@pytest.mark.parametrize("path", ["/browser/login", "/browser/refresh", "/browser/logout"])
@pytest.mark.parametrize(("headers", "reason", "origin"), REFUSED)
def test_a_request_failing_the_csrf_checks_is_refused_with_only_an_audit_record(
    live: LiveServer, path: str, headers: dict[str, str], reason: str, origin: str | None
) -> None:
    _, cookie = login(live)
    before = live.types()
    response = browser_post(live, path, ADA, cookie, headers=headers)
    assert_oauth_error(response, 403, "invalid_request")
    assert "set-cookie" not in response.headers
    assert live.types() == before
    [refusal] = live.events("browser-refusal:")
    assert refusal.type == "BrowserRequestRefused"
    event = refusal.event
    assert (event.endpoint, event.reason, event.origin) == (path, reason, origin)  # type: ignore[attr-defined]
    assert refusal.metadata["request_id"]
    assert browser_post(live, "/browser/refresh", SPA, cookie).status_code == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"username=ada&password=x&client_id=spa"),
        ("application/json", b"{not json"),
        ("application/json", b"[]"),
        ("application/json", b'{"username": "ada", "client_id": "spa"}'),
        ("application/json", b'{"username": "ada", "password": 5, "client_id": "spa"}'),
        ("application/json", b'{"username": "", "password": "x", "client_id": "spa"}'),
        ("application/json", b'{"username": "ada", "username": "bob", "password": "x"}'),
        ("application/json", b"[" * 20000),
    ],
)
def test_a_malformed_login_is_invalid_request(
    live: LiveServer, content_type: str, body: bytes
) -> None:
    headers = {**HEADERS, "Content-Type": content_type}
    response = requests.post(live.url + "/browser/login", data=body, headers=headers, timeout=30)
    assert_oauth_error(response, 400, "invalid_request")
    assert live.types("") == []


def test_bad_credentials_are_invalid_grant_as_at_the_token_endpoint(live: LiveServer) -> None:
    response = browser_post(live, "/browser/login", {**ADA, "password": "wrong"})
    assert_oauth_error(response, 400, "invalid_grant")
    assert "set-cookie" not in response.headers
    assert live.types("principal:") == ["LoginFailed"]


@pytest.mark.parametrize("client_id", ["backend", "no-such-client"])
def test_only_public_clients_may_use_browser_mode(live: LiveServer, client_id: str) -> None:
    response = browser_post(live, "/browser/login", {**ADA, "client_id": client_id})
    assert_oauth_error(response, 400, "invalid_client")
    assert "www-authenticate" not in response.headers  # no password prompt in the browser


def test_a_client_without_the_password_grant_cannot_log_in(live: LiveServer) -> None:
    response = browser_post(live, "/browser/login", {**ADA, "client_id": "refresh-only"})
    assert_oauth_error(response, 400, "unauthorized_client")


def test_a_cookie_is_refused_to_another_client(live: LiveServer) -> None:
    live.accounts.add_client("other-spa", None, ("password", "refresh_token"))
    _, cookie = login(live)
    response = browser_post(live, "/browser/refresh", {"client_id": "other-spa"}, cookie)
    assert_oauth_error(response, 400, "invalid_grant")
    assert live.types() == ["SessionStarted"]


def test_the_issuers_origin_is_allowed_whatever_its_path(live_factory: Any) -> None:
    live = live_factory(issuer="https://Ledger.test:443/auth")
    assert browser_post(live, "/browser/login", ADA).status_code == 200


def test_the_client_script_is_served_and_the_demo_only_in_demo_mode(live: LiveServer) -> None:
    script = live.get("/static/session-client.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "export class SessionClient" in script.text
    assert live.get("/demo").status_code == 404


@pytest.mark.slow
def test_serve_demo_serves_the_demo_page_and_accepts_its_origin(db_url: str) -> None:
    shared = ("--demo", "--demo-on-shared-database")
    with serving(*shared, env={"LEDGER_DATABASE_URL": db_url}) as (url, process):
        page = requests.get(f"{url}/demo", timeout=30)
        body = {"username": "demo", "password": "demo-password", "client_id": "demo-spa"}
        headers = {"Origin": url, "X-Requested-With": "test"}
        login = requests.post(f"{url}/browser/login", json=body, headers=headers, timeout=30)
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert page.status_code == 200
    assert 'from "./static/session-client.js"' in page.text
    assert login.status_code == 200, login.text
    assert f"{url}/demo" in output
