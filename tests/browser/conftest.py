"""Browser tests: Debian's chromium, driven by Playwright, against a live API on loopback.

The server runs on the test's ManualClock and the pages on Playwright's paused clock; `advance`
moves both by the same amount, so no test waits for real time to pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Response,
    expect,
    sync_playwright,
)
from psycopg_pool import ConnectionPool

from api.accounts import Accounts
from api.http.app import create_app
from api.http.browser import REFRESH_COOKIE
from api.settings import Settings
from ledger.clock import ManualClock
from projections.session import Policy
from tests.api.conftest import CHEAP_HASHER, PASSWORD, LiveServer, loopback_socket, serve_on

CHROMIUM = Path("/usr/bin/chromium")
expect.set_options(timeout=10_000)  # bounded waits for the page, generous on a loaded machine
# Short enough that a test sees several refreshes and an idle logout within a few minutes of
# (simulated) time. The client refreshes a fifth of the lifetime early: at 48 s.
SHORT_POLICY = Policy(
    access_token_ttl=timedelta(seconds=60),
    idle_timeout=timedelta(seconds=120),
    absolute_timeout=timedelta(hours=2),
    refresh_grace=timedelta(seconds=10),
    activity_debounce=timedelta(seconds=10),
)


# Package scope, not session: while Playwright's sync API is open it keeps an event loop running
# in the main thread, and later tests that run their own (asyncio.run, as the soak does) would fail.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def ledger_accounts(pool: ConnectionPool) -> Accounts:
    accounts = Accounts(pool, CHEAP_HASHER)
    accounts.add_user("ada", PASSWORD, ("profile",))
    accounts.add_client("spa", None, ("password", "refresh_token"))
    return accounts


@pytest.fixture
def ledger(
    request: pytest.FixtureRequest,
    db_url: str,
    pool: ConnectionPool,
    clock: ManualClock,
    ledger_accounts: Accounts,
) -> Iterator[LiveServer]:
    """The API in demo mode on a free port; its own origin is the only one allowed (the default).
    Parametrized indirectly, the parameter holds more settings."""
    sock = loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    more: dict[str, Any] = getattr(request, "param", {})
    settings = Settings(database_url=db_url, issuer=url, policy=SHORT_POLICY, demo=True, **more)
    app = create_app(settings, db_url, clock=clock, hasher=CHEAP_HASHER)
    stop = serve_on(app, sock)
    with requests.Session() as http:
        yield LiveServer(url, clock, pool, http, settings, ledger_accounts, app, stop)
    stop()


@dataclass
class Browsing:
    """One browser context (one user's browser: shared cookies, several tabs) on the ledger."""

    ledger: LiveServer
    context: BrowserContext
    statuses: list[tuple[int, str]] = field(default_factory=list)

    def open(self, *, dpop: bool = True) -> Page:
        """A tab on the demo page, logged in if the browser holds a session; its client binds
        sessions to a DPoP key unless `dpop` is false."""
        page = self.context.new_page()
        page.on("response", self._note)
        page.goto(f"{self.ledger.url}/demo?client_id=spa{'' if dpop else '&dpop=off'}")
        expect(page.locator("#status")).not_to_have_text("Starting…")
        return page

    def advance(self, seconds: int) -> None:
        """Move the server's clock, then the pages' (firing their timers on the way)."""
        self.ledger.clock.advance(timedelta(seconds=seconds))
        self.context.clock.run_for(seconds * 1000)

    def refresh_cookie(self) -> dict[str, Any] | None:
        cookies = [c for c in self.context.cookies() if c["name"] == REFRESH_COOKIE]
        return dict(cookies[0]) if cookies else None

    def _note(self, response: Response) -> None:
        self.statuses.append((response.status, response.url))


@pytest.fixture
def browsing(browser: Browser, ledger: LiveServer) -> Iterator[Browsing]:
    context = browser.new_context()
    context.set_default_timeout(10_000)
    start = ledger.clock.now()
    context.clock.install(time=start - timedelta(seconds=1))
    context.clock.pause_at(start)  # from here on, page time moves only with advance()
    yield Browsing(ledger, context)
    context.close()


def log_in(page: Page) -> None:
    page.fill("#username", "ada")
    page.fill("#password", PASSWORD)
    page.click("#login")
    expect(page.locator("#status")).to_have_text("Logged in.")
    expect(page.locator("#result")).to_have_text("call 1: 200")


def call(page: Page) -> None:
    """Call GET /sessions through the client and expect it to succeed."""
    shown = re.match(r"call (\d+)", page.locator("#result").text_content() or "")
    number = int(shown[1]) + 1 if shown else 1
    page.click("#call")
    expect(page.locator("#result")).to_have_text(f"call {number}: 200")


def touch(page: Page) -> None:
    """User input: what the client reports as activity."""
    page.keyboard.press("Shift")


def page_events(page: Page, name: str) -> Locator:
    return page.locator(f"#events li[data-event={name}]")
