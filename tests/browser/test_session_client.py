"""The demo SPA and session-client.js in a real browser: the refresh token out of JavaScript's
reach, refresh before expiry, tabs sharing one session, theft detection, CSRF, idle logout."""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect

from api.http.browser import REFRESH_COOKIE
from tests.browser.conftest import Browsing, call, log_in, page_events, touch

pytestmark = pytest.mark.browser


def test_login_keeps_the_refresh_token_out_of_javascript(browsing: Browsing) -> None:
    page = browsing.open()
    with page.expect_response(lambda r: r.url.endswith("/browser/login")) as login:
        log_in(page)
    cookie = browsing.refresh_cookie()
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert cookie["path"] == "/"  # the __Host- prefix demands it
    assert page.evaluate("isSecureContext")  # Chromium counts http://127.0.0.1 as secure
    assert cookie["value"] not in page.evaluate("document.cookie")
    assert REFRESH_COOKIE not in page.evaluate("document.cookie")
    body = login.value.json()
    assert "refresh_token" not in body
    assert cookie["value"] not in login.value.text()
    expect(page.locator("#sessions tr")).to_have_count(1)
    call(page)
    assert browsing.ledger.types() == ["SessionStarted"]


def test_the_client_refreshes_before_expiry_and_no_call_sees_a_401(browsing: Browsing) -> None:
    page = browsing.open()
    log_in(page)
    for refreshes in range(1, 4):
        for _ in range(5):  # 50 s: the token (60 s) is refreshed 12 s early, at 48 s
            browsing.advance(10)
            touch(page)
            call(page)
        expect(page_events(page, "refreshed")).to_have_count(refreshes)
    assert [s for s, _ in browsing.statuses if s == 401] == []
    events = browsing.ledger.events("session:")
    issued = [e.occurred_at for e in events if e.type in ("SessionStarted", "RefreshTokenRotated")]
    assert len(issued) == 4
    assert all((b - a).total_seconds() < 60 for a, b in itertools.pairwise(issued))
    assert "SessionEnded" not in browsing.ledger.types()


REFRESHED = "window.sessionClient.refresh().then((token) => token !== null)"


def refresh_in_both(first: Page, second: Page) -> None:
    """Both tabs ask for a new token at once: the second as the first's message reaches it."""
    second.evaluate(f"""() => {{
        window.go = new BroadcastChannel("test-go");
        window.go.onmessage = () => {{ window.pending = {REFRESHED}; }};
    }}""")
    first.evaluate(f"""() => {{
        new BroadcastChannel("test-go").postMessage("go");
        window.pending = {REFRESHED};
    }}""")
    second.wait_for_function("() => window.pending !== undefined")
    for page in (first, second):
        assert page.evaluate("window.pending") is True


def test_two_tabs_refreshing_at_the_same_moment_raise_no_reuse_alarm(browsing: Browsing) -> None:
    first = browsing.open()
    log_in(first)
    second = browsing.open()  # continues the session from the cookie; the first tab hears of it
    expect(second.locator("#status")).to_have_text("Logged in.")
    expect(page_events(first, "refreshed")).to_have_count(1)
    browsing.statuses.clear()  # the first tab's resume before login was refused, rightly
    for _ in range(5):  # both tabs' refresh timers fire at the same moment, at 48 s
        browsing.advance(10)
        touch(first)
        touch(second)
    for page in (first, second):
        expect(page_events(page, "refreshed")).to_have_count(2)
    refresh_in_both(first, second)
    for page in (first, second):
        call(page)
    types = browsing.ledger.types()
    # The second tab's resume, then one refresh each time: the other tab received its result.
    assert types.count("RefreshTokenRotated") == 3
    assert "RefreshTokenReuseDetected" not in types
    assert "SessionEnded" not in types
    assert [s for s, _ in browsing.statuses if s >= 400] == []


def test_without_web_locks_simultaneous_refreshes_stay_in_the_grace_window(
    browsing: Browsing,
) -> None:
    browsing.context.add_init_script("delete Navigator.prototype.locks;")
    first = browsing.open()
    assert first.evaluate("navigator.locks") is None
    log_in(first)
    second = browsing.open()
    expect(second.locator("#status")).to_have_text("Logged in.")
    browsing.statuses.clear()
    for _ in range(5):
        browsing.advance(10)
        touch(first)
        touch(second)
    for page in (first, second):
        expect(page_events(page, "refreshed").nth(1)).to_be_attached()
    refresh_in_both(first, second)
    for page in (first, second):
        call(page)
    types = browsing.ledger.types()
    assert "RefreshTokenReuseDetected" not in types
    assert "SessionEnded" not in types
    assert [s for s, _ in browsing.statuses if s >= 400] == []


def test_a_refresh_token_replayed_outside_the_browser_revokes_the_session(
    browsing: Browsing,
) -> None:
    page = browsing.open(dpop=False)  # a bound session's thief would need the key (test_dpop)
    log_in(page)
    stolen = browsing.refresh_cookie()
    assert stolen is not None
    browsing.advance(10)
    assert page.evaluate("window.sessionClient.refresh().then((token) => token !== null)")
    rotated = browsing.refresh_cookie()
    assert rotated is not None
    assert rotated["value"] != stolen["value"]
    browsing.advance(11)  # past the grace window
    form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": stolen["value"]}
    replay = requests.post(f"{browsing.ledger.url}/oauth/token", data=form, timeout=30)
    assert replay.status_code == 400
    assert "reuse" in replay.json()["error_description"]
    page.click("#call")  # 401: the session is gone; the refresh that follows is refused
    expect(page_events(page, "reuse-detected")).to_have_count(1)
    expect(page.locator("#status")).to_have_text(
        "Refresh token reuse detected: the session was revoked."
    )
    expect(page.locator("#login-form")).to_be_visible()
    assert browsing.refresh_cookie() is None
    types = browsing.ledger.types()
    assert types[-2:] == ["RefreshTokenReuseDetected", "SessionEnded"]


class _EvilPage(BaseHTTPRequestHandler):
    """A page on another origin that posts to the ledger as a cross-site form would."""

    target = ""

    def do_GET(self) -> None:
        # JSON smuggled in a text/plain form: {"client_id": "spa", "x": "="}
        form = f"""<form id="f" method="POST" action="{self.target}" enctype="text/plain">
<input name='{{"client_id": "spa", "x": "' value='"}}'></form>
<script>document.getElementById("f").submit();</script>"""
        body = f"<!doctype html><title>evil</title>{form if self.path == '/' else ''}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def evil_origin(browsing: Browsing) -> Iterator[str]:
    handler = type("Evil", (_EvilPage,), {"target": f"{browsing.ledger.url}/browser/refresh"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=30)


def test_a_cross_origin_page_posting_to_refresh_gets_403(
    browsing: Browsing, evil_origin: str
) -> None:
    page = browsing.open()
    log_in(page)
    cookie = browsing.refresh_cookie()
    evil = browsing.context.new_page()
    with evil.expect_response(lambda r: r.url.endswith("/browser/refresh")) as posted:
        evil.goto(evil_origin)
    response = posted.value
    assert response.status == 403
    assert response.json()["error"] == "invalid_request"
    # Same site (ports do not count), so SameSite=Strict let the cookie travel: Origin stopped it.
    assert REFRESH_COOKIE in response.request.all_headers().get("cookie", "")
    with_header = f"""() => fetch("{browsing.ledger.url}/browser/refresh", {{
        method: "POST", credentials: "include", headers: {{"X-Requested-With": "x"}},
    }}).then((r) => r.status, () => "blocked")"""
    evil.goto(f"{evil_origin}/again")
    assert evil.evaluate(with_header) == "blocked"  # the CORS preflight is never granted
    assert browsing.ledger.types() == ["SessionStarted"]
    [refusal] = browsing.ledger.events("browser-refusal:")
    assert (refusal.event.reason, refusal.event.origin) == ("origin", evil_origin)  # type: ignore[attr-defined]
    assert browsing.refresh_cookie() == cookie
    call(page)


def test_a_request_without_the_custom_header_gets_403(browsing: Browsing) -> None:
    page = browsing.open()
    log_in(page)
    bare = """() => fetch("/browser/refresh", {
        method: "POST", credentials: "include",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify({client_id: "spa"}),
    }).then(async (r) => [r.status, (await r.json()).error])"""
    assert page.evaluate(bare) == [403, "invalid_request"]
    [refusal] = browsing.ledger.events("browser-refusal:")
    assert refusal.event.reason == "header"  # type: ignore[attr-defined]
    assert browsing.ledger.types() == ["SessionStarted"]
    assert page.evaluate("window.sessionClient.refresh().then((token) => token !== null)")


def test_an_idle_user_is_logged_out_when_the_idle_timeout_passes(browsing: Browsing) -> None:
    page = browsing.open()
    log_in(page)
    for _ in range(11):  # 110 s without input: the token lapses unrefreshed, the session lives
        browsing.advance(10)
    expect(page.locator("#status")).to_have_text("Logged in.")
    browsing.advance(10)  # 120 s: the idle timeout
    expect(page.locator("#status")).to_have_text("Logged out after inactivity.")
    expect(page_events(page, "idle-logout")).to_have_count(1)
    assert browsing.refresh_cookie() is None
    events = browsing.ledger.events("session:")
    assert [e.type for e in events] == ["SessionStarted", "SessionEnded"]
    assert events[-1].event.reason == "idle_timeout"  # type: ignore[attr-defined]


def test_activity_keeps_the_session_alive_past_the_idle_timeout(browsing: Browsing) -> None:
    page = browsing.open()
    log_in(page)
    for _ in range(24):  # 240 s, twice the idle timeout, with input every 10 s
        browsing.advance(10)
        touch(page)
    expect(page.locator("#status")).to_have_text("Logged in.")
    call(page)
    types = browsing.ledger.types()
    assert types.count("ActivityRecorded") >= 4
    assert "SessionEnded" not in types


def test_logout_in_one_tab_logs_out_the_other(browsing: Browsing) -> None:
    first = browsing.open()
    log_in(first)
    second = browsing.open()
    expect(second.locator("#status")).to_have_text("Logged in.")
    first.click("#logout")
    for page in (first, second):
        expect(page.locator("#status")).to_have_text("Logged out.")
        expect(page.locator("#login-form")).to_be_visible()
    expect(page_events(second, "logged-out")).to_have_text([re.compile(r"\(logout\)$")])
    assert browsing.refresh_cookie() is None
    events = browsing.ledger.events("session:")
    assert [e.type for e in events].count("SessionEnded") == 1
    assert events[-1].event.reason == "logout"  # type: ignore[attr-defined]


def test_logout_everywhere_ends_the_users_other_sessions(browsing: Browsing) -> None:
    ledger = browsing.ledger
    elsewhere = ledger.login()  # another device, through the token endpoint
    page = browsing.open()
    log_in(page)
    expect(page.locator("#sessions tr")).to_have_count(2)
    page.click("#logout-everywhere")
    expect(page.locator("#status")).to_have_text("Logged out everywhere.")
    assert ledger.refresh(elsewhere["refresh_token"]).status_code == 400
    assert ledger.types().count("SessionEnded") == 2
