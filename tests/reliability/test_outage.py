"""A PostgreSQL outage under a client loop: 503s while it is down, recovery without a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from api.accounts import Accounts
from api.app import create_app
from api.settings import Settings
from ledger.clock import ManualClock
from ledger.db import open_pool
from ledger.embedded import stop_embedded
from ledger.store import START, EventStore
from projections.catalog import PROJECTIONS
from projections.rebuild import rebuild
from tests.api.conftest import CHEAP_HASHER, PASSWORD, TEST_POLICY, serve_in_thread
from tests.api.test_cli import run

# The longest any request may take while the database is down: the pool waits up to its
# 10 s timeout for a connection before the request is answered 503.
REQUEST_BOUND = 15.0


def start_database(data_dir: Path) -> str:
    """Start the embedded server from another process, as an operator would, and return its URL.

    pgserver keeps one handle per data directory in each process, so restarting it from the test
    process itself would hand back the stopped server's handle.
    """
    result = run("db", "url", env={"LEDGER_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@contextmanager
def embedded_database(data_dir: Path) -> Iterator[str]:
    url = start_database(data_dir)
    try:
        with open_pool(url) as pool:
            accounts = Accounts(pool, CHEAP_HASHER)
            accounts.add_user("ada", PASSWORD, ("profile",))
            accounts.add_user("bob", PASSWORD, ("profile",))
            accounts.add_client("spa", None, ("password", "refresh_token"))
        yield url
    finally:
        stop_embedded(data_dir)


@contextmanager
def live_api(url: str) -> Iterator[str]:
    settings = Settings(
        database_url=url, issuer="https://ledger.test", policy=TEST_POLICY, run_projections=False
    )
    clock = ManualClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
    base, stop = serve_in_thread(create_app(settings, url, clock=clock, hasher=CHEAP_HASHER))
    try:
        yield base
    finally:
        stop()


@dataclass
class Seen:
    """One response the client loop saw."""

    kind: str
    status: int
    seconds: float
    body: dict[str, Any]
    retry_after: str | None
    at: float = field(default_factory=time.monotonic)


class ClientLoop:
    """Threads that refresh one session each, and one that logs in, until stopped."""

    def __init__(self, base: str, tokens: list[str]) -> None:
        self.base = base
        self.tokens = tokens
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._refresh_forever, args=(i,), daemon=True)
            for i in range(len(tokens))
        ]
        self._threads.append(threading.Thread(target=self._login_forever, daemon=True))

    def __enter__(self) -> ClientLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_BOUND * 2)
            assert not thread.is_alive()

    def count(self, kind: str, status: int, since: float = 0.0) -> int:
        with self._lock:
            return sum(
                1 for s in self.seen if s.kind == kind and s.status == status and s.at > since
            )

    def _refresh_forever(self, i: int) -> None:
        with requests.Session() as http:
            while not self._stop.is_set():
                form = {"grant_type": "refresh_token", "refresh_token": self.tokens[i]}
                seen = self._post(http, "refresh", form)
                if seen.status == 200:
                    self.tokens[i] = seen.body["refresh_token"]
                elif seen.status == 400:
                    return  # cleanly refused: this client would log in again

    def _login_forever(self) -> None:
        with requests.Session() as http:
            while not self._stop.is_set():
                form = {"grant_type": "password", "username": "bob", "password": PASSWORD}
                self._post(http, "login", form)
                self._stop.wait(0.05)  # a login every so often, not a storm of sessions

    def _post(self, http: requests.Session, kind: str, form: dict[str, str]) -> Seen:
        began = time.monotonic()
        response = http.post(
            f"{self.base}/oauth/token", data={"client_id": "spa", **form}, timeout=60
        )
        seen = Seen(
            kind,
            response.status_code,
            time.monotonic() - began,
            response.json(),
            response.headers.get("Retry-After"),
        )
        with self._lock:
            self.seen.append(seen)
        return seen


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # a condition, not a timing: bounded by the deadline
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def login(base: str, username: str) -> dict[str, Any]:
    form = {"grant_type": "password", "client_id": "spa", "username": username}
    response = requests.post(f"{base}/oauth/token", data={**form, "password": PASSWORD}, timeout=60)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    began = time.monotonic()
    response = call()
    return response, time.monotonic() - began


def assert_unavailable(response: requests.Response, seconds: float) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "the database cannot be reached",
    }
    assert seconds < REQUEST_BOUND


@pytest.mark.slow
def test_a_database_restart_answers_503_then_recovers_without_losing_an_event(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "pgdata"
    with embedded_database(data_dir) as url, live_api(url) as base:
        before = [login(base, name) for name in ("ada", "bob", "ada")]
        with ClientLoop(base, [t["refresh_token"] for t in before]) as loop:
            wait_for(lambda: loop.count("refresh", 200) >= 6, 30, "refreshes before the outage")
            assert stop_embedded(data_dir)
            down = time.monotonic()

            form = {"grant_type": "password", "client_id": "spa", "username": "ada"}
            token = f"{base}/oauth/token"
            assert_unavailable(*timed(lambda: requests.post(token, data=form, timeout=60)))
            health, seconds = timed(lambda: requests.get(f"{base}/healthz", timeout=60))
            assert (health.status_code, health.json()["database"]) == (503, False)
            assert seconds < REQUEST_BOUND
            wait_for(lambda: loop.count("refresh", 503, down) >= 3, 60, "503s to refreshes")

            assert start_database(data_dir) == url  # same data dir, same socket, same URL
            up = time.monotonic()
            wait_for(lambda: loop.count("login", 200, up) >= 1, 60, "a login after the restart")
            wait_for(lambda: loop.count("refresh", 200, up) >= 3, 60, "refreshes after it")
            recovered = time.monotonic()
        held = list(loop.tokens)
        seen = list(loop.seen)
        report(seen, down, up, recovered)

        assert requests.get(f"{base}/healthz", timeout=60).status_code == 200
        assert_loop_saw_only_clean_answers(seen)
        after: list[int] = []
        for refresh_token in held:
            form = {"grant_type": "refresh_token", "client_id": "spa"}
            response = requests.post(
                token, data={**form, "refresh_token": refresh_token}, timeout=60
            )
            assert response.status_code in (200, 400), response.text
            if response.status_code == 400:
                assert response.json()["error"] == "invalid_grant"
            after.append(response.status_code)
        for tokens in before:  # access tokens from before the outage: valid, or refused cleanly
            bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
            response = requests.get(f"{base}/sessions", headers=bearer, timeout=60)
            assert response.status_code in (200, 401), response.text
            after.append(response.status_code)
        print(f"tokens held through the outage, then used: {after}")
    # The server was stopped above; start it once more to inspect what the outage left.
    url = start_database(data_dir)
    try:
        assert_ledger_intact(url)
    finally:
        stop_embedded(data_dir)


def report(seen: list[Seen], down: float, up: float, recovered: float) -> None:
    """Print the figures RELIABILITY.md quotes (visible with `pytest -s`)."""
    unavailable = [s.seconds for s in seen if s.status == 503]
    counts = {status: sum(1 for s in seen if s.status == status) for status in (200, 400, 503)}
    print(
        f"\noutage: {len(seen)} responses {counts}; slowest 503 {max(unavailable):.2f} s;"
        f" down {up - down:.1f} s; first refreshes back {recovered - up:.1f} s after restart;"
        f" slowest response {max(s.seconds for s in seen):.2f} s"
    )


def assert_loop_saw_only_clean_answers(seen: list[Seen]) -> None:
    statuses = {s.status for s in seen}
    assert statuses <= {200, 400, 503}, statuses
    assert 503 in statuses
    for s in seen:
        assert s.seconds < REQUEST_BOUND, s
        if s.status == 503:
            assert s.retry_after is not None
            assert int(s.retry_after) > 0
            assert s.body["error"] == "temporarily_unavailable"
        if s.status == 400:
            assert s.body["error"] == "invalid_grant", s


def assert_ledger_intact(url: str) -> None:
    with open_pool(url, max_size=2) as pool:
        store = EventStore(pool)
        streams = {e.stream_id for e in store.iter_all(START)}
        assert any(s.startswith("session:") for s in streams)
        for stream_id in streams:
            versions = [e.version for e in store.read_stream(stream_id)]
            assert versions == list(range(1, len(versions) + 1)), stream_id
        assert store.verify() == []
        assert rebuild(url, store, PROJECTIONS["sessions"], check=True) == []
