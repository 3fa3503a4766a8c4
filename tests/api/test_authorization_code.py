"""The authorization-code flow with PKCE (RFC 6749 §4.1, RFC 7636, RFC 9207): the hosted login
page, codes that are single-use, short-lived and bound, and the refusals, each in its place
(the error page, or the redirect URI) and with no session created."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from psycopg_pool import ConnectionPool

from api.http.authorize import LOGIN_COOKIE
from ledger.store import EventStore
from projections.sql.catalog import PROJECTIONS
from projections.sql.rebuild import rebuild
from projections.sql.runner import Runner
from tests.api.conftest import PASSWORD, DpopKey, LiveServer
from tests.api.test_oauth import CountingHasher

APP = "app"
CALLBACK = "https://app.test/callback?from=ledger"  # a query of its own, kept (RFC 6749 §3.1.2)
ISSUER = "https://ledger.test"


@pytest.fixture
def app(live: LiveServer) -> LiveServer:
    live.accounts.add_client(
        APP, None, ("authorization_code", "refresh_token"), redirect_uris=(CALLBACK,)
    )
    return live


class _Form(HTMLParser):
    """The login page's form fields (hidden ones with their values) and its error, if any."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.labels: list[str] = []
        self.error: str | None = None
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "input" and attributes.get("name"):
            self.fields[str(attributes["name"])] = attributes.get("value") or ""
        if tag == "label":
            self._in = "label"
        if tag == "p" and attributes.get("role") == "alert":
            self._in = "error"

    def handle_data(self, data: str) -> None:
        if self._in == "label":
            self.labels.append(data)
        elif self._in == "error":
            self.error = (self.error or "") + data

    def handle_endtag(self, tag: str) -> None:
        self._in = None


@dataclass
class Browser:
    """What a browser does with the login page: keeps its cookie and posts its form."""

    live: LiveServer
    cookies: dict[str, str] = field(default_factory=dict)

    def get(self, url: str) -> requests.Response:
        response = requests.get(url, headers=self._cookie(), allow_redirects=False, timeout=30)
        self._keep(response)
        return response

    def post(self, fields: dict[str, str], **headers: str) -> requests.Response:
        response = requests.post(
            f"{self.live.url}/oauth/authorize",
            data=fields,
            headers={**self._cookie(), **headers},
            allow_redirects=False,
            timeout=30,
        )
        self._keep(response)
        return response

    def log_in(self, page: requests.Response, password: str = PASSWORD) -> requests.Response:
        form = _Form()
        form.feed(page.text)
        return self.post({**form.fields, "username": "ada", "password": password})

    def _cookie(self) -> dict[str, str]:
        jar = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
        return {"Cookie": jar} if jar else {}

    def _keep(self, response: requests.Response) -> None:
        for name, value in response.cookies.items():
            self.cookies[name] = value


def _authorize_url(live: LiveServer, **params: str) -> str:
    return f"{live.url}/oauth/authorize?{urlencode(params)}"


def _params(verifier: str = "v" * 43, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": CALLBACK,
        "code_challenge": create_s256_code_challenge(verifier),
        "code_challenge_method": "S256",
        "state": "st-1",
    }
    return {k: v for k, v in {**params, **extra}.items() if v != ""}


def _redirected(response: requests.Response) -> dict[str, list[str]]:
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith("https://app.test/callback?from=ledger&")
    return parse_qs(urlsplit(location).query)


def _code(live: LiveServer, verifier: str = "v" * 43) -> str:
    browser = Browser(live)
    page = browser.get(_authorize_url(live, **_params(verifier)))
    return _redirected(browser.log_in(page))["code"][0]


def _exchange(
    live: LiveServer, code: str, verifier: str = "v" * 43, **form: str
) -> requests.Response:
    body = {
        "grant_type": "authorization_code",
        "client_id": APP,
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": verifier,
        **form,
    }
    return live.post("/oauth/token", data=body)


def test_authlib_logs_in_through_the_hosted_page_and_refreshes(app: LiveServer) -> None:
    client = OAuth2Session(
        client_id=APP,
        redirect_uri=CALLBACK,
        token_endpoint_auth_method="none",
        code_challenge_method="S256",
        scope="profile",
    )
    verifier = generate_token(48)
    url, state = client.create_authorization_url(
        f"{app.url}/oauth/authorize", code_verifier=verifier
    )
    browser = Browser(app)
    page = browser.get(url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    form = _Form()
    form.feed(page.text)
    assert form.labels == ["User name", "Password"]
    assert form.fields["csrf_token"]
    assert "code_verifier" not in page.text
    assert verifier not in page.text
    answer = browser.log_in(page)
    back = _redirected(answer)
    assert back["state"] == [state]
    assert back["iss"] == [ISSUER]  # RFC 9207
    assert app.types("") == ["AuthorizationCodeIssued"]
    (issued,) = app.events("authorization-code:")
    code = back["code"][0]
    assert code not in str(issued.data)
    assert code not in issued.stream_id
    token = client.fetch_token(
        f"{app.url}/oauth/token", authorization_response=answer.headers["location"],
        code_verifier=verifier,
    )  # fmt: skip
    assert (token["token_type"], token["scope"]) == ("Bearer", "profile")
    assert app.types("") == [
        "AuthorizationCodeIssued",
        "AuthorizationCodeRedeemed",
        "SessionStarted",
    ]
    refreshed = client.refresh_token(f"{app.url}/oauth/token", token["refresh_token"])
    assert refreshed["refresh_token"] != token["refresh_token"]
    assert app.get("/sessions", headers=app.bearer(refreshed["access_token"])).status_code == 200


def test_the_login_page_is_locked_down(app: LiveServer) -> None:
    page = Browser(app).get(_authorize_url(app, **_params()))
    assert page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy
    assert "script-src" not in policy
    assert "default-src 'none'" in policy
    assert "form-action 'self' https://app.test" in policy
    assert "<script" not in page.text
    assert page.headers["cache-control"] == "no-store"
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{LOGIN_COOKIE}=")
    assert all(flag in cookie for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"))


def test_the_metadata_announces_the_code_flow(live: LiveServer) -> None:
    meta = live.get("/.well-known/oauth-authorization-server").json()
    assert meta["authorization_endpoint"] == f"{ISSUER}/oauth/authorize"
    assert meta["response_types_supported"] == ["code"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert "authorization_code" in meta["grant_types_supported"]


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"redirect_uri": "https://evil.test/callback"}, "not one registered"),
        ({"redirect_uri": CALLBACK + "&x=1"}, "not one registered"),  # modified: exact match
        ({"redirect_uri": ""}, "no redirect_uri"),
        ({"client_id": "nobody"}, "unknown client"),
        ({"client_id": ""}, "no client"),
    ],
)
def test_an_untrusted_redirect_uri_gets_an_error_page_never_a_redirect(
    app: LiveServer, change: dict[str, str], shown: str
) -> None:
    page = Browser(app).get(_authorize_url(app, **_params(**change)))
    assert page.status_code == 400
    assert "location" not in page.headers
    form = _Form()
    form.feed(page.text)
    assert form.error is not None
    assert shown in form.error
    assert app.types("") == []


@pytest.mark.parametrize(
    ("change", "error", "said"),
    [
        ({"code_challenge": ""}, "invalid_request", "code_challenge is required"),
        ({"code_challenge_method": "plain"}, "invalid_request", "must be S256"),
        ({"code_challenge_method": ""}, "invalid_request", "must be S256"),
        ({"code_challenge": "short"}, "invalid_request", "43 characters"),
        ({"response_type": "token"}, "unsupported_response_type", "must be code"),
        ({"scope": "a\\b"}, "invalid_scope", "scope"),
    ],
)
def test_a_bad_request_with_a_trusted_redirect_uri_goes_back_with_the_error(
    app: LiveServer, change: dict[str, str], error: str, said: str
) -> None:
    back = _redirected(Browser(app).get(_authorize_url(app, **_params(**change))))
    assert back["error"] == [error]
    assert said in back["error_description"][0]
    assert (back["state"], back["iss"]) == (["st-1"], [ISSUER])
    assert app.types("") == []


def test_a_missing_state_comes_back_missing(app: LiveServer) -> None:
    back = _redirected(
        Browser(app).get(_authorize_url(app, **_params(state="", response_type="x")))
    )
    assert "state" not in back
    assert back["error"] == ["unsupported_response_type"]


def test_a_client_without_the_grant_is_refused_at_its_redirect_uri(live: LiveServer) -> None:
    live.accounts.add_client("pw-only", None, ("password",), redirect_uris=(CALLBACK,))
    back = _redirected(Browser(live).get(_authorize_url(live, **_params(client_id="pw-only"))))
    assert back["error"] == ["unauthorized_client"]


def test_a_bad_password_shows_the_page_again_and_is_recorded(app: LiveServer) -> None:
    browser = Browser(app)
    page = browser.get(_authorize_url(app, **_params()))
    again = browser.log_in(page, password="wrong")
    assert again.status_code == 400
    form = _Form()
    form.feed(again.text)
    assert form.error == "invalid username or password"
    assert form.fields["csrf_token"]  # ready for another try
    assert app.types("") == ["LoginFailed"]
    assert _redirected(browser.log_in(again))["code"]


def test_a_login_form_without_its_csrf_token_or_cookie_is_refused(app: LiveServer) -> None:
    browser = Browser(app)
    page = browser.get(_authorize_url(app, **_params()))
    form = _Form()
    form.feed(page.text)
    fields = {**form.fields, "username": "ada", "password": PASSWORD}
    for forged in (
        {k: v for k, v in fields.items() if k != "csrf_token"},
        {**fields, "csrf_token": "x" * 43},
        {**fields, "csrf_token": "é" * 43},
    ):
        refused = browser.post(forged)
        assert refused.status_code == 403
        assert "location" not in refused.headers
    cookieless = Browser(app).post(fields)  # another browser: the token is not for its cookie
    assert cookieless.status_code == 403
    cross_site = browser.post(fields, Origin="https://evil.test")
    assert cross_site.status_code == 403
    assert app.types("") == []


def test_a_code_is_single_use_and_its_replay_revokes_the_session(app: LiveServer) -> None:
    code = _code(app)
    first = _exchange(app, code)
    assert first.status_code == 200, first.text
    tokens = first.json()
    replay = app.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "client_id": APP, "code": code,
              "redirect_uri": CALLBACK, "code_verifier": "v" * 43},
        headers={"User-Agent": "thief/2"},
    )  # fmt: skip
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    assert "used before" in replay.json()["error_description"]
    revoked = app.refresh(tokens["refresh_token"], client_id=APP)
    assert revoked.json()["error"] == "invalid_grant"
    (replayed,) = [
        e for e in app.events("authorization-code:") if e.type == "AuthorizationCodeReplayed"
    ]
    assert replayed.data["user_agent"] == "thief/2"
    first_use = replayed.data["first_use"]
    assert isinstance(first_use, dict)
    assert (first_use["ip"], first_use["user_agent"]) == (
        "127.0.0.1",
        f"python-requests/{requests.__version__}",
    )
    (ended,) = [e for e in app.events("session:") if e.type == "SessionEnded"]
    assert ended.data["reason"] == "code_replayed"


def test_a_wrong_verifier_another_client_or_redirect_uri_is_refused_and_recorded(
    app: LiveServer,
) -> None:
    app.accounts.add_client(
        "other", None, ("authorization_code", "refresh_token"), redirect_uris=(CALLBACK,)
    )
    code = _code(app)
    refusals = [
        (_exchange(app, code, verifier="w" * 43), "PKCE"),
        (_exchange(app, code, client_id="other"), "another client"),
        (_exchange(app, code, redirect_uri="https://app.test/callback"), "redirect_uri"),
        (_exchange(app, code, code_verifier=""), "code_verifier"),
    ]
    for refused, said in refusals:
        assert refused.status_code == 400
        assert said in refused.json()["error_description"], refused.text
        assert refused.json()["error"] in ("invalid_grant", "invalid_request")
    assert "SessionStarted" not in app.types()
    reasons = [
        e.data["reason"]
        for e in app.events("authorization-code:")
        if e.type == "AuthorizationCodeRefused"
    ]
    assert reasons == ["verifier", "client", "redirect_uri"]
    assert _exchange(app, code).status_code == 200  # the rightful client still can


def test_an_expired_code_is_refused(app: LiveServer) -> None:
    code = _code(app)
    app.clock.advance(timedelta(seconds=60))
    refused = _exchange(app, code)
    assert refused.json()["error"] == "invalid_grant"
    assert "expired" in refused.json()["error_description"]
    assert "SessionStarted" not in app.types()


def test_an_unknown_code_is_refused(app: LiveServer) -> None:
    refused = _exchange(app, "no-such-code")
    assert refused.json() == {
        "error": "invalid_grant",
        "error_description": "the authorization code is not valid",
    }


def test_a_code_redemption_with_a_proof_binds_the_session(app: LiveServer) -> None:
    key = DpopKey(app.clock, ISSUER)
    code = _code(app)
    body = {"grant_type": "authorization_code", "client_id": APP, "code": code,
            "redirect_uri": CALLBACK, "code_verifier": "v" * 43}  # fmt: skip
    granted = app.post(
        "/oauth/token", data=body, headers={"DPoP": key.proof("POST", "/oauth/token")}
    )
    assert granted.json()["token_type"] == "DPoP"
    (started,) = [e for e in app.events("session:") if e.type == "SessionStarted"]
    assert started.data["jkt"] == key.jkt


def test_the_login_page_does_the_same_password_work_for_unknown_users(
    live_factory: Callable[..., LiveServer],
) -> None:
    hasher = CountingHasher()
    live = live_factory(hasher=hasher)
    live.accounts.add_client(
        APP, None, ("authorization_code", "refresh_token"), redirect_uris=(CALLBACK,)
    )

    def verifications(username: str) -> int:
        browser = Browser(live)
        page = browser.get(_authorize_url(live, **_params()))
        form = _Form()
        form.feed(page.text)
        before = hasher.verified
        refused = browser.post({**form.fields, "username": username, "password": "wrong"})
        assert refused.status_code == 400
        return hasher.verified - before

    assert verifications("mallory") == verifications("ada") == 1
    reasons = [e.data["reason"] for e in live.events("principal:")]
    assert reasons == ["unknown_user", "wrong_password"]


def test_a_replayed_code_is_an_alert(app: LiveServer, pool: ConnectionPool) -> None:
    app.accounts.add_user("sec", PASSWORD, ("audit",))
    auditor = app.bearer(app.login(username="sec", scope="audit")["access_token"])
    code = _code(app)
    sid = jwt.decode(
        _exchange(app, code).json()["access_token"], options={"verify_signature": False}
    )["sid"]
    assert _exchange(app, code).status_code == 400
    Runner(app.settings.database_url or "", pool).run_once()
    (alert,) = app.get("/audit/alerts", headers=auditor).json()["alerts"]
    assert (alert["kind"], alert["session_id"], alert["ip"]) == ("code_replayed", sid, "127.0.0.1")


def test_every_projection_rebuilds_the_same_after_the_code_flow(app: LiveServer) -> None:
    code = _code(app)
    assert _exchange(app, code).status_code == 200
    assert _exchange(app, code).status_code == 400  # replayed: the session ends
    assert _exchange(app, _code(app), verifier="w" * 43).status_code == 400
    Runner(app.settings.database_url or "", app.pool).run_once()
    store = EventStore(app.pool)
    for projection in PROJECTIONS.values():
        drift = rebuild(app.settings.database_url or "", store, projection, check=True)
        assert drift == [], projection.name


def test_the_browser_exchange_sets_the_refresh_cookie_and_no_token_in_the_body(
    app: LiveServer,
) -> None:
    headers = {"Origin": ISSUER, "X-Requested-With": "test"}
    body = {"client_id": APP, "code": _code(app), "redirect_uri": CALLBACK}
    wrong = requests.post(
        f"{app.url}/browser/token", json={**body, "code_verifier": "w" * 43}, headers=headers,
        timeout=30,
    )  # fmt: skip
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
    assert "set-cookie" not in wrong.headers
    answer = requests.post(
        f"{app.url}/browser/token", json={**body, "code_verifier": "v" * 43}, headers=headers,
        timeout=30,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert "refresh_token" not in answer.json()
    assert answer.cookies.get("__Host-ledger-refresh")
    cross_site = requests.post(
        f"{app.url}/browser/token", json={**body, "code_verifier": "v" * 43},
        headers={**headers, "Origin": "https://evil.test"}, timeout=30,
    )  # fmt: skip
    assert cross_site.status_code == 403
