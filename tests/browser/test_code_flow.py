"""The demo page logs in through the server's login page (the authorization code with PKCE) in
Chromium: the page never sees the password nor the refresh token, and its calls succeed."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.api.conftest import PASSWORD
from tests.browser.conftest import Browsing, call

pytestmark = pytest.mark.browser


def test_the_demo_logs_in_through_the_login_page(browsing: Browsing) -> None:
    ledger = browsing.ledger
    back = f"{ledger.url}/demo?client_id=spa"
    ledger.accounts.widen_client("spa", ("authorization_code",), (back,))
    page = browsing.open()
    page.click("#login-redirect")
    page.wait_for_url(re.compile(r"/oauth/authorize\?"))
    expect(page.get_by_label("User name")).to_be_visible()
    page.get_by_label("User name").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    with page.expect_response(lambda r: r.url.endswith("/browser/token")) as exchanged:
        page.get_by_role("button", name="Sign in").click()
    assert exchanged.value.status == 200
    assert "refresh_token" not in exchanged.value.json()
    expect(page.locator("#status")).to_have_text("Logged in.")
    expect(page.locator("#result")).to_have_text("call 1: 200")
    assert page.url == back  # the code, state and iss are gone from the address bar
    assert page.evaluate("sessionStorage.length") == 0  # the verifier too
    call(page)
    assert browsing.refresh_cookie() is not None
    types = ledger.types("")
    assert [t for t in types if t.startswith(("Authorization", "Session"))] == [
        "AuthorizationCodeIssued",
        "AuthorizationCodeRedeemed",
        "SessionStarted",
    ]
    (started,) = [e for e in ledger.events("session:") if e.type == "SessionStarted"]
    assert started.data["jkt"]  # bound to the page's DPoP key, as a password login is


def test_an_error_sent_back_is_shown_and_logs_nobody_in(browsing: Browsing) -> None:
    ledger = browsing.ledger
    back = f"{ledger.url}/demo?client_id=spa"
    ledger.accounts.widen_client("spa", ("authorization_code",), (back,))
    page = browsing.open()
    page.evaluate("window.sessionClient.loginWithRedirect({ scope: 'a\\\\b' })")
    page.wait_for_url(re.compile(r"/demo\?client_id=spa$"))
    expect(page.locator("#login-error")).to_contain_text("scope")
    expect(page.locator("#login-form")).to_be_visible()
    assert ledger.types("") == []
