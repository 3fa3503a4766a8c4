"""session-client.js with DPoP (RFC 9449) in Chromium: a key no script can export, kept in
IndexedDB for every tab, proofs on each refresh and API call, server nonces, and a cookie that is
worth nothing to another browser, which lacks the key."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
import requests
from playwright.sync_api import Page, Request, expect

from api.dpop import thumbprint, token_hash
from api.http.browser import REFRESH_COOKIE
from tests.api.conftest import PASSWORD
from tests.browser.conftest import Browsing, call, log_in

pytestmark = pytest.mark.browser

# The stored key as the page sees it: its public JWK, algorithm, session and extractability.
STORED_KEY = """async () => {
    const { DPOP_DATABASE } = await import("/static/session-client.js");
    const db = await new Promise((resolve, reject) => {
        const opening = indexedDB.open(DPOP_DATABASE, 1);
        opening.onupgradeneeded = () => opening.result.createObjectStore("keys");
        opening.onsuccess = () => resolve(opening.result);
        opening.onerror = () => reject(opening.error);
    });
    const record = await new Promise((resolve) => {
        const got = db.transaction("keys").objectStore("keys").get("spa");
        got.onsuccess = () => resolve(got.result);
    });
    db.close();
    if (!record) return null;
    let exported = "exported";
    try {
        await crypto.subtle.exportKey("jwk", record.privateKey);
    } catch (error) {
        exported = error.name;
    }
    return {
        jwk: record.jwk, alg: record.alg, sid: record.sid,
        extractable: record.privateKey.extractable, exported,
    };
}"""


def stored_key(page: Page) -> dict[str, Any] | None:
    key: dict[str, Any] | None = page.evaluate(STORED_KEY)
    return key


def requests_of(page: Page) -> list[Request]:
    seen: list[Request] = []
    page.on("request", lambda request: seen.append(request))
    return seen


def proof_parts(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of the request's DPoP proof."""
    proof = request.all_headers()["dpop"]
    return jwt.get_unverified_header(proof), jwt.decode(proof, options={"verify_signature": False})


def session_jkt(browsing: Browsing) -> str:
    (started,) = [e for e in browsing.ledger.events("session:") if e.type == "SessionStarted"]
    jkt = started.data["jkt"]
    assert isinstance(jkt, str)
    return jkt


def test_the_key_cannot_be_exported_and_binds_the_session(browsing: Browsing) -> None:
    page = browsing.open()
    sent = requests_of(page)
    log_in(page)
    key = stored_key(page)
    assert key is not None
    assert (key["extractable"], key["exported"]) == (False, "InvalidAccessError")
    assert key["alg"] == "ES256"  # the default
    assert "d" not in key["jwk"]
    assert session_jkt(browsing) == thumbprint(key["jwk"])
    login = next(r for r in sent if r.url.endswith("/browser/login"))
    header, claims = proof_parts(login)
    assert (header["typ"], header["jwk"]) == ("dpop+jwt", key["jwk"])
    assert (claims["htm"], claims["htu"]) == ("POST", f"{browsing.ledger.url}/browser/login")
    # The API call: the DPoP scheme and a proof of that very request, holding the token's hash.
    api = next(r for r in sent if r.url.endswith("/sessions"))
    scheme, token = api.all_headers()["authorization"].split(" ")
    assert scheme == "DPoP"
    _, claims = proof_parts(api)
    assert (claims["htm"], claims["htu"]) == ("GET", f"{browsing.ledger.url}/sessions")
    assert claims["ath"] == token_hash(token)


def test_two_tabs_share_the_key(browsing: Browsing) -> None:
    first = browsing.open()
    log_in(first)
    second = browsing.open()
    sent = requests_of(second)
    second.reload()  # resumes the session from the cookie, with a proof by the stored key
    expect(second.locator("#status")).to_have_text("Logged in.")
    assert stored_key(second) == stored_key(first)
    refresh = next(r for r in sent if r.url.endswith("/browser/refresh"))
    header, _ = proof_parts(refresh)
    assert thumbprint(header["jwk"]) == session_jkt(browsing)
    for page in (first, second):
        call(page)
    assert "DpopProofRefused" not in browsing.ledger.types()
    assert [s for s, url in browsing.statuses if s >= 400 and "/sessions" in url] == []


def test_the_cookie_replayed_by_another_client_without_the_key_fails(
    browsing: Browsing,
) -> None:
    page = browsing.open()
    log_in(page)
    cookie = browsing.refresh_cookie()
    assert cookie is not None
    # Another browser, with the cookie but not the key: its client finds no session to resume.
    other = browsing.context.browser.new_context()  # type: ignore[union-attr]
    try:
        other.add_cookies([cookie])  # type: ignore[list-item]
        thief = other.new_page()
        with thief.expect_response(lambda r: r.url.endswith("/browser/refresh")) as refreshed:
            thief.goto(f"{browsing.ledger.url}/demo?client_id=spa")
        assert refreshed.value.status == 400
        assert refreshed.value.json()["error"] == "invalid_dpop_proof"
        expect(thief.locator("#login-form")).to_be_visible()
    finally:
        other.close()
    # Nor does a script outside any browser get anywhere with it.
    replay = requests.post(
        f"{browsing.ledger.url}/browser/refresh",
        json={"client_id": "spa"},
        headers={
            "Origin": browsing.ledger.url,
            "X-Requested-With": "x",
            "Cookie": f"{REFRESH_COOKIE}={cookie['value']}",
        },
        timeout=30,
    )
    assert replay.json()["error"] == "invalid_dpop_proof"
    refusals = [e for e in browsing.ledger.events("session:") if e.type == "DpopProofRefused"]
    assert [e.data["reason"] for e in refusals] == ["missing", "missing"]
    # The owner goes on: the session is neither ended nor rotated by the attempts.
    assert page.evaluate("window.sessionClient.refresh().then((token) => token !== null)")
    call(page)
    assert "SessionEnded" not in browsing.ledger.types()


def test_logout_deletes_the_key(browsing: Browsing) -> None:
    first = browsing.open()
    log_in(first)
    second = browsing.open()
    expect(second.locator("#status")).to_have_text("Logged in.")
    first.click("#logout")
    expect(second.locator("#login-form")).to_be_visible()
    for page in (first, second):
        assert stored_key(page) is None
    assert browsing.ledger.types()[-1] == "SessionEnded"
    assert "DpopProofRefused" not in browsing.ledger.types()  # the logout carried its proof


def test_an_ed25519_key_where_the_browser_has_one(browsing: Browsing) -> None:
    page = browsing.open()
    supported = page.evaluate("""() => crypto.subtle.generateKey({ name: "Ed25519" }, false,
        ["sign"]).then(() => true, () => false)""")
    if not supported:
        pytest.skip("this Chromium has no Ed25519 in WebCrypto")
    page.evaluate(
        """async (password) => {
            const { SessionClient } = await import("/static/session-client.js");
            const client = new SessionClient({ clientId: "spa", dpopAlgorithm: "EdDSA" });
            await client.login("ada", password);
            const response = await client.fetch("/sessions");
            if (response.status !== 200) throw new Error(`GET /sessions: ${response.status}`);
        }""",
        PASSWORD,
    )
    key = stored_key(page)
    assert key is not None
    assert (key["alg"], key["jwk"]["kty"], key["jwk"]["crv"]) == ("EdDSA", "OKP", "Ed25519")
    assert session_jkt(browsing) == thumbprint(key["jwk"])


@pytest.mark.parametrize("ledger", [{"dpop_nonce": True}], indirect=True)
def test_the_client_retries_once_with_the_servers_nonce(browsing: Browsing) -> None:
    page = browsing.open()
    sent = requests_of(page)
    log_in(page)
    logins = [r for r in sent if r.url.endswith("/browser/login")]
    assert len(logins) == 2
    first, retried = (r.response() for r in logins)
    assert first is not None
    assert retried is not None
    assert (first.status, first.json()["error"]) == (400, "use_dpop_nonce")
    _, claims = proof_parts(logins[1])
    assert claims["nonce"] == first.all_headers()["dpop-nonce"]
    assert retried.status == 200
    # The next refresh names the nonce of the last answer at once: no second refusal.
    assert page.evaluate("window.sessionClient.refresh().then((token) => token !== null)")
    refresh = next(r for r in sent if r.url.endswith("/browser/refresh"))
    _, claims = proof_parts(refresh)
    assert claims["nonce"] == retried.all_headers()["dpop-nonce"]
    assert json.dumps([r.response().status for r in sent if "/browser/" in r.url]) == (  # type: ignore[union-attr]
        "[400, 200, 200]"
    )
