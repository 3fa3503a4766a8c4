"""Worker crash: SIGKILL one of two `serve` workers in a refresh storm; the other serves on and
no session ends up with two live generations or a projection row that disagrees with its events.

Each client refreshes its own session in a loop; every few steps it presents one token twice at
once (two tabs), which the grace window answers with one successor. A client whose connection the
kill cut retries with the same token: it must get that same successor, never a reuse detection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import requests
from psycopg_pool import ConnectionPool

from api.accounts import Accounts
from ledger.events import RefreshTokenRotated
from ledger.store import EventStore
from projections import session
from projections.sql.inline import load_session
from projections.streams import session_stream_id
from tests.api import conftest as api_fixtures
from tests.api.conftest import PASSWORD
from tests.api.test_cli import run
from tests.api.test_serve import serving
from tests.waiting import wait_until

accounts = api_fixtures.accounts

SESSIONS = 8
USERS = ("ada", "bob", "cy", "dee")  # the sessions go round these; the fixture adds ada and bob
TWIN_EVERY = 4  # every fourth step presents its token twice at once
STEPS_BEFORE_KILL = 120  # across all clients
STEPS_AFTER_KILL = 20  # each client's, all begun after the kill, before the storm stops
STORM_BOUND = 15.0  # seconds; a storm that has not got there by then fails
ATTEMPTS = 5  # per refresh: the first and the retries after a cut connection
# What a request to a worker killed under it raises: the connection is reset or closed early.
CUT = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)
STARTED = "Started server process"
READY = "Application startup complete."

Post = Callable[..., requests.Response]


@dataclass
class ServeLog:
    """The serve process's output, read as it comes so that its access log never fills the pipe."""

    lines: list[tuple[float, str]] = field(default_factory=list)

    def drain(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def count(self, text: str) -> int:
        return sum(1 for _, line in list(self.lines) if text in line)

    def first_after(self, text: str, since: float) -> float | None:
        """When a line with `text` first came after `since`, if one did."""
        return next((at for at, line in list(self.lines) if at > since and text in line), None)


@contextmanager
def serving_two_workers(db_url: str) -> Iterator[tuple[str, subprocess.Popen[str], ServeLog]]:
    """`serve --workers 2` with both workers ready; stopped, its output read to the end, after."""
    env = {"LEDGER_DATABASE_URL": db_url, "LEDGER_ADDRESS_LOGIN_LIMIT": "100000"}
    with serving("--workers", "2", env=env) as (url, process):
        assert process.stdout is not None
        log = ServeLog()
        drainer = threading.Thread(target=log.drain, args=(process.stdout,), daemon=True)
        drainer.start()
        try:
            wait_until(lambda: log.count(READY) >= 2, timeout=60, what="both workers ready")
            yield url, process, log
        finally:
            # The supervisor stops its workers itself; a SIGTERM to the whole group would have it
            # replace the workers that ended before it saw its own.
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
            drainer.join(timeout=60)


def workers(serve_pid: int) -> set[int]:
    """The worker processes of `serve` (uvicorn starts them with multiprocessing's spawn)."""
    children: set[int] = set()
    for task in Path(f"/proc/{serve_pid}/task").iterdir():
        with suppress(FileNotFoundError):  # a thread that ended while we looked
            children.update(int(pid) for pid in (task / "children").read_text().split())
    return {pid for pid in children if b"spawn_main" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    with suppress(FileNotFoundError, ProcessLookupError):  # a process that ended meanwhile
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def generation(refresh_token: str) -> int:
    return int(refresh_token.split(".")[1])  # <session>.<generation>.<mac>


def session_id(refresh_token: str) -> str:
    return refresh_token.split(".")[0]


def login(url: str, username: str) -> str:
    form = {"grant_type": "password", "client_id": "spa", "username": username}
    response = requests.post(f"{url}/oauth/token", data={**form, "password": PASSWORD}, timeout=30)
    assert response.status_code == 200, f"login of {username}: {response.text}"
    token: str = response.json()["refresh_token"]
    return token


def refresh_once(url: str, refresh_token: str) -> str:
    form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": refresh_token}
    response = requests.post(f"{url}/oauth/token", data=form, timeout=30)
    assert response.status_code == 200, f"the newest token of a chain: {response.text}"
    token: str = response.json()["refresh_token"]
    return token


@dataclass
class Storm:
    """Clients refreshing one session each against the server, and everything they saw."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    cuts: list[float] = field(default_factory=list)  # when each cut connection was noticed
    retries: int = 0
    twins: int = 0
    steps: int = 0
    steps_after_kill: Counter[int] = field(default_factory=Counter)  # per client, begun after
    deadline: float = field(default_factory=lambda: time.monotonic() + STORM_BOUND)
    kill_sent: float = float("inf")  # just before the SIGKILL
    killed_at: float = float("inf")  # just after it
    ended: float = float("inf")  # when the clients were told to stop
    answers_after_kill: list[float] = field(default_factory=list)  # 200s to requests sent after

    def client(self, index: int, token: str, twins: ThreadPoolExecutor) -> list[str]:
        """Refresh until stopped; return every refresh token received, oldest first."""
        chain = [token]
        with requests.Session() as http:
            while not self.stop.is_set():
                began = time.monotonic()
                chain.append(self.step(http.post, chain[-1], len(chain) % TWIN_EVERY == 0, twins))
                with self.lock:
                    self.steps += 1
                    self.steps_after_kill[index] += began > self.killed_at
        return chain

    def step(self, post: Post, token: str, twin: bool, twins: ThreadPoolExecutor) -> str:
        if not twin:
            return self.refresh(post, token)
        theirs: Future[str] = twins.submit(self.refresh, requests.post, token)
        mine = self.refresh(post, token)
        assert theirs.result() == mine, f"one token presented twice got two successors: {token}"
        with self.lock:
            self.twins += 1
        return mine

    def refresh(self, post: Post, token: str) -> str:
        """The successor of `token`, retrying with the same token when the connection is cut."""
        for attempt in range(ATTEMPTS):
            response = self.send(post, token, is_retry=attempt > 0)
            if response is not None:
                assert response.status_code == 200, (
                    f"refresh: {response.status_code} {response.text}"
                )
                successor: str = response.json()["refresh_token"]
                assert generation(successor) == generation(token) + 1, "not the next generation"
                return successor
        raise AssertionError(f"{ATTEMPTS} attempts to refresh were all cut: {token}")

    def send(self, post: Post, token: str, *, is_retry: bool) -> requests.Response | None:
        form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": token}
        began = time.monotonic()
        with self.lock:
            self.sent += 1
            self.retries += is_retry
        try:
            response = post(f"{self.url}/oauth/token", data=form, timeout=30)
        except CUT:
            with self.lock:
                self.cuts.append(time.monotonic())
            return None
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code == 200 and began > self.killed_at:
                self.answers_after_kill.append(time.monotonic())
        return response

    def kill_a_worker(self, serve_pid: int) -> tuple[int, int]:
        """SIGKILL the lower-numbered of the two workers; return it and the survivor."""
        pids = workers(serve_pid)
        assert len(pids) == 2, f"serve --workers 2 runs the workers {pids}"
        victim, survivor = sorted(pids)
        self.kill_sent = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        self.killed_at = time.monotonic()
        return victim, survivor

    def until(self, condition: Callable[[], bool], clients: list[Future[list[str]]]) -> None:
        """Wait for `condition` while every client runs; a client's failure is raised here."""

        def reached() -> bool:
            for done in (c for c in clients if c.done()):
                done.result()
                raise AssertionError("a client stopped before the storm did")
            return condition()

        remaining = self.deadline - time.monotonic()
        wait_until(reached, timeout=remaining, what=f"the storm to get there in {STORM_BOUND} s")


def storm_with_a_kill(
    storm: Storm, tokens: list[str], serve_pid: int
) -> tuple[list[list[str]], int, int]:
    """Run the clients, kill a worker mid-storm, stop once every client has gone on after it."""
    with ThreadPoolExecutor(SESSIONS) as twins, ThreadPoolExecutor(SESSIONS) as pool:
        clients = [pool.submit(storm.client, i, token, twins) for i, token in enumerate(tokens)]
        try:
            storm.until(lambda: storm.steps >= STEPS_BEFORE_KILL, clients)
            victim, survivor = storm.kill_a_worker(serve_pid)
            after = storm.steps_after_kill
            storm.until(lambda: min(after[i] for i in range(SESSIONS)) >= STEPS_AFTER_KILL, clients)
        finally:
            storm.stop.set()
            storm.ended = time.monotonic()
        return [client.result() for client in clients], victim, survivor


def assert_only_the_kill_cut(storm: Storm, replaced_at: float | None) -> float:
    """Every answer was a 200 and every failure a connection the kill cut; the survivor answered
    before any replacement worker had started. Returns when it first answered."""
    assert set(storm.statuses) == {200}, f"statuses other than 200: {storm.statuses}"
    assert all(at > storm.kill_sent for at in storm.cuts), "a connection was cut before the kill"
    # At most one cut per connection open at the kill: each client's own and its twin's.
    assert len(storm.cuts) <= 2 * SESSIONS, f"{len(storm.cuts)} cuts: more than were open"
    answered = min(storm.answers_after_kill, default=None)
    assert answered is not None, "nothing was answered after the kill"
    assert replaced_at is None or answered < replaced_at, "only a replacement worker answered"
    return answered


def lost_answers(storm: Storm, rotations: int, retries: int) -> int:
    """Cut requests whose rotation had committed: their retry got a grace answer.

    Every 200 of the storm is a rotation, the grace answer to a twin, or the grace answer to
    such a retry, and each grace answer is a RefreshTokenRetried; each client's last refresh
    came after the storm."""
    graced = storm.statuses[200] - (rotations - SESSIONS)
    lost = graced - storm.twins
    assert 0 <= lost <= len(storm.cuts), f"{storm.statuses[200]} answers do not add up: {lost}"
    # A retry the kill cut after its commit was recorded but never answered.
    assert graced <= retries <= graced + len(storm.cuts), f"{retries} retries, {graced} answered"
    return lost


def assert_ledger_whole(pool: ConnectionPool, chains: list[list[str]]) -> tuple[int, int]:
    """Every chain and session stream is one line of generations; returns the rotations and
    the grace retries."""
    for chain in chains:
        generations = [generation(token) for token in chain]
        assert generations == list(range(1, len(chain) + 1)), f"a chain forked: {generations}"
    rotations = sum(assert_stream_agrees(EventStore(pool), pool, chain) for chain in chains)
    with pool.connection() as conn:
        streams = conn.execute(
            "SELECT count(DISTINCT stream_id) FROM events WHERE stream_type = 'session'"
        ).fetchone()
        reuses, retries = conn.execute(
            "SELECT count(*) FILTER (WHERE type = 'RefreshTokenReuseDetected'),"
            " count(*) FILTER (WHERE type = 'RefreshTokenRetried') FROM events"
        ).fetchone() or (0, 0)
    assert streams == (SESSIONS,), f"{streams} session streams, not {SESSIONS}"
    assert reuses == 0, f"{reuses} reuse detections"
    return rotations, retries


def assert_stream_agrees(store: EventStore, pool: ConnectionPool, chain: list[str]) -> int:
    """The session's versions are 1..n, its generations 2..newest once each, and its projection
    row is the fold of its events; returns its rotations."""
    sid, newest = session_id(chain[-1]), generation(chain[-1])
    events = store.read_stream(session_stream_id(sid))
    versions = [e.version for e in events]
    assert versions == list(range(1, len(events) + 1)), f"{sid}: versions {versions} not 1..n"
    rotated = [e.event.generation for e in events if isinstance(e.event, RefreshTokenRotated)]
    assert rotated == list(range(2, newest + 1)), f"{sid}: generations {rotated}, not 2..{newest}"
    types = {e.type for e in events}
    allowed = {"SessionStarted", "RefreshTokenRotated", "RefreshTokenRetried", "ActivityRecorded"}
    assert types <= allowed, f"{sid}: {types}"
    with pool.connection() as conn:
        row = load_session(conn, sid, for_update=False)
    assert row == session.replay(sid, (e.event for e in events)), f"{sid}: row is not the fold"
    return len(rotated)


def replacement(pids: list[int], ready: float | None, ended: float) -> str:
    if not pids:
        return "no replacement worker"
    return f"replacement worker {pids} {'ready' if ready and ready < ended else 'not yet ready'}"


def assert_cli_clean(db_url: str) -> None:
    for command in (["verify"], ["rebuild", "--check"]):
        result = run(*command, env={"LEDGER_DATABASE_URL": db_url})
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"


@pytest.mark.slow
def test_a_worker_killed_in_a_refresh_storm_leaves_one_serving_and_every_session_whole(
    db_url: str, pool: ConnectionPool, accounts: Accounts
) -> None:
    for user in USERS[2:]:
        accounts.add_user(user, PASSWORD, ("profile",))
    with serving_two_workers(db_url) as (url, process, log):
        tokens = [login(url, USERS[i % len(USERS)]) for i in range(SESSIONS)]
        storm = Storm(url)
        chains, victim, survivor = storm_with_a_kill(storm, tokens, process.pid)
        serving_now = workers(process.pid)
        assert survivor in serving_now, f"the surviving worker {survivor} is gone"
        chains = [[*chain, refresh_once(url, chain[-1])] for chain in chains]
    replacements = sorted(serving_now - {survivor})
    answered = assert_only_the_kill_cut(storm, log.first_after(STARTED, storm.kill_sent))
    rotations, retries = assert_ledger_whole(pool, chains)
    lost = lost_answers(storm, rotations, retries)
    assert_cli_clean(db_url)

    ready = log.first_after(READY, storm.kill_sent)
    print(
        f"\nworker crash: {storm.sent} refresh requests, statuses {dict(storm.statuses)},"
        f" {len(storm.cuts)} connection errors, {storm.retries} retries ({lost} after a"
        f" committed rotation), {storm.twins} twin pairs, {rotations} rotations over"
        f" {SESSIONS} sessions; killed worker {victim},"
        f" survivor {survivor} answered {answered - storm.killed_at:.3f} s after the kill;"
        f" {replacement(replacements, ready, storm.ended)} when the storm ended,"
        f" {storm.ended - storm.killed_at:.1f} s after the kill"
    )
