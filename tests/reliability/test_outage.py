"""A PostgreSQL outage under a client loop: 503s while it is down, recovery without a restart.

It runs twice: against the API in a thread of the test, and against `session-ledger serve
--workers 2`, whose workers each have their own pool and projection runner.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from api.accounts import Accounts
from api.http.app import create_app
from api.ratelimit import RateLimit
from api.settings import MAX_ADDRESS_LOGIN_LIMIT, Settings
from ledger.clock import ManualClock
from ledger.db import open_pool
from ledger.embedded import stop_embedded
from ledger.store import START, EventStore
from projections.sql.catalog import PROJECTIONS
from projections.sql.rebuild import rebuild
from tests.api.conftest import CHEAP_HASHER, PASSWORD, TEST_POLICY, login_at, serve_in_thread
from tests.api.test_cli import EXECUTABLE, run
from tests.api.test_serve import free_port, stop_process_group
from tests.waiting import wait_until

# The longest any request may take while the database is down. A request waits at most
# FAIL_FAST_SECONDS (0.5 s) for a connection before the pool probes the server, and a probe on
# a local socket fails at once; seen: 0.5-0.9 s. The rest is headroom for a loaded 2-core
# machine.
REQUEST_BOUND = 5.0
SERVE_STARTUP = 60.0  # seconds for `serve` to start both workers
READY = "Application startup complete."  # what uvicorn logs once per worker


def start_database(data_dir: Path) -> str:
    """Start the embedded server from another process, as an operator would, and return its URL.

    pgserver keeps one handle per data directory in each process, so restarting it from the test
    process itself would hand back the stopped server's handle.
    """
    env = {"LEDGER_DATA_DIR": str(data_dir)}
    result = run("db", "url", env=env)
    if "there is no database" in result.stderr:  # the first start: create it
        assert run("db", "init", env=env).returncode == 0
        result = run("db", "url", env=env)
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
def in_thread(url: str, tmp_path: Path) -> Iterator[str]:
    """The API in a thread of the test, on a clock that stands still."""
    settings = Settings(
        database_url=url,
        issuer="https://ledger.test",
        policy=TEST_POLICY,
        run_projections=False,
        # Every login comes from 127.0.0.1 and the clock never moves, so the default bucket (30
        # at once) would never refill: the login loop, one every 50 ms, would get 429s.
        address_logins=RateLimit(limit=MAX_ADDRESS_LOGIN_LIMIT),
    )
    clock = ManualClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
    base, stop = serve_in_thread(create_app(settings, url, clock=clock, hasher=CHEAP_HASHER))
    try:
        yield base
    finally:
        stop()


@contextmanager
def two_workers(url: str, tmp_path: Path) -> Iterator[str]:
    """`session-ledger serve --workers 2` on the database and the real clock, until both workers
    are ready; stopped after.

    Its output goes to a file: uvicorn's access log fills a pipe nobody reads within a few hundred
    requests, and then the workers freeze on their next write.
    """
    port, log_path = free_port(), tmp_path / "serve.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    # Every login comes from 127.0.0.1: the per-address limit must not be what answers them.
    env = {**clean, "LEDGER_DATABASE_URL": url, "LEDGER_ADDRESS_LOGIN_LIMIT": "100000"}
    with log_path.open("w") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen(
            [EXECUTABLE, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one process group, for stop_process_group to sweep
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, process, log_path)
        yield base
    finally:
        # The supervisor stops its workers itself; a SIGTERM to the whole group at once could have
        # it replace a worker that ended before it saw its own signal.
        process.terminate()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        stop_process_group(process)  # whatever is left of the group, if the supervisor did not end


def wait_until_serving(base: str, process: subprocess.Popen[str], log_path: Path) -> None:
    def ready() -> bool:
        assert process.poll() is None, f"serve exited with {process.returncode}:{tail(log_path)}"
        return is_healthy(base) and log_path.read_text().count(READY) >= 2

    try:
        wait_until(ready, timeout=SERVE_STARTUP, what="serve ready")
    except AssertionError as e:
        raise AssertionError(f"{e}:{tail(log_path)}") from None


def is_healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def tail(log_path: Path, lines: int = 30) -> str:
    return "\n" + "\n".join(log_path.read_text().splitlines()[-lines:])


SERVERS: dict[str, Callable[[str, Path], AbstractContextManager[str]]] = {
    "in-thread": in_thread,
    "serve --workers 2": two_workers,
}


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
@pytest.mark.parametrize("variant", list(SERVERS), ids=["in-thread", "serve-workers-2"])
def test_a_database_restart_answers_503_then_recovers_without_losing_an_event(
    variant: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "pgdata"
    with embedded_database(data_dir) as url:
        with SERVERS[variant](url, tmp_path) as base:
            before = [login_at(base, name) for name in ("ada", "bob", "ada")]
            loop, down, up, recovered = outage_under_load(
                base, data_dir, url, [t["refresh_token"] for t in before]
            )
            report(variant, loop.seen, down, up, recovered)
            # Each worker's own pool finds the server back at its next reconnection attempt;
            # the refreshes above may have reached the other worker first. Six in a row: both
            # workers are back, as each new connection may reach either.
            wait_until(
                lambda: all(
                    requests.get(f"{base}/healthz", timeout=60).status_code == 200 for _ in range(6)
                ),
                timeout=30,
                what="/healthz to answer 200 again",
            )
            assert_loop_saw_only_clean_answers(loop.seen, down)
            after = use_held_tokens(base, loop.tokens, before)
            print(f"tokens held through the outage, then used: {after}")
        assert_ledger_intact(url)  # what the outage left, once the API has stopped


def outage_under_load(
    base: str, data_dir: Path, url: str, refresh_tokens: list[str]
) -> tuple[ClientLoop, float, float, float]:
    """Stop PostgreSQL under the client loop, then start it again without touching the API.
    Returns the stopped loop, and when the server went down, came up, and was used again."""
    with ClientLoop(base, refresh_tokens) as loop:
        wait_until(
            lambda: loop.count("refresh", 200) >= 6, timeout=30, what="refreshes before the outage"
        )
        assert stop_embedded(data_dir)
        down = time.monotonic()

        form = {"grant_type": "password", "client_id": "spa", "username": "ada"}
        form["password"] = PASSWORD
        token = f"{base}/oauth/token"
        assert_unavailable(*timed(lambda: requests.post(token, data=form, timeout=60)))
        health, seconds = timed(lambda: requests.get(f"{base}/healthz", timeout=60))
        assert (health.status_code, health.json()["database"]) == (503, False)
        assert seconds < REQUEST_BOUND
        wait_until(
            lambda: loop.count("refresh", 503, down) >= 3, timeout=60, what="503s to refreshes"
        )

        assert start_database(data_dir) == url  # same data dir, same socket, same URL
        up = time.monotonic()
        wait_until(
            lambda: loop.count("login", 200, up) >= 1, timeout=60, what="a login after the restart"
        )
        wait_until(
            lambda: loop.count("refresh", 200, up) >= 3, timeout=60, what="refreshes after it"
        )
        recovered = time.monotonic()
    return loop, down, up, recovered


def use_held_tokens(base: str, held: list[str], before: list[dict[str, Any]]) -> list[int]:
    """Refresh tokens the loop held at the end, and access tokens from before the outage: each
    works or is refused cleanly. Returns the statuses."""
    after: list[int] = []
    for refresh_token in held:
        form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": refresh_token}
        response = requests.post(f"{base}/oauth/token", data=form, timeout=60)
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            assert response.json()["error"] == "invalid_grant"
        after.append(response.status_code)
    for tokens in before:
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        response = requests.get(f"{base}/sessions", headers=bearer, timeout=60)
        assert response.status_code in (200, 401), response.text
        after.append(response.status_code)
    return after


def report(variant: str, seen: list[Seen], down: float, up: float, recovered: float) -> None:
    """Print the figures RELIABILITY.md quotes (visible with `pytest -s`), naming the variant."""
    unavailable = [s.seconds for s in seen if s.status == 503]
    counts = {status: sum(1 for s in seen if s.status == status) for status in (200, 400, 503)}
    print(
        f"\noutage ({variant}): {len(seen)} responses {counts};"
        f" slowest 503 {max(unavailable):.2f} s; down {up - down:.1f} s;"
        f" first refreshes back {recovered - up:.1f} s after restart;"
        f" slowest response {max(s.seconds for s in seen):.2f} s"
    )


def assert_loop_saw_only_clean_answers(seen: list[Seen], down: float) -> None:
    statuses = {s.status for s in seen}
    assert statuses <= {200, 400, 503}, statuses
    assert 503 in statuses
    for s in seen:
        sent = s.at - s.seconds - down
        assert s.seconds < REQUEST_BOUND, f"{s}, sent {sent:+.2f} s after the server stopped"
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
