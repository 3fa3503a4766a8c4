"""`session-ledger serve` as a real process: several workers, the demo, start-up errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from psycopg_pool import ConnectionPool

from api.accounts import Accounts
from api.cli.serve import demo_walkthrough
from ledger.embedded import is_embedded_running
from ledger.store import START, EventStore
from tests.api.conftest import PASSWORD
from tests.api.test_cli import EXECUTABLE, run
from tests.api.test_hostile import race_refreshes
from tests.waiting import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(
    *args: str, env: dict[str, str], port: int = 0
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run `session-ledger serve` on `port` (a free one by default) until it answers /healthz;
    stop it after."""
    port = port or free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    process = subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(port), *args],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its workers form one process group we can stop together
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited early: {process.communicate()[0]}")
            try:
                return requests.get(f"{url}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout=60, what="serve to answer /healthz")
        yield url, process
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[str]) -> None:
    with suppress(ProcessLookupError):  # the test may have stopped it already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


@pytest.mark.slow
def test_two_workers_let_one_of_twenty_parallel_refreshes_rotate(
    db_url: str, pool: ConnectionPool, accounts: Accounts
) -> None:
    with serving("--workers", "2", env={"LEDGER_DATABASE_URL": db_url}) as (url, _):
        form = {"grant_type": "password", "client_id": "spa", "username": "ada"}
        login = requests.post(f"{url}/oauth/token", data={**form, "password": PASSWORD}, timeout=30)
        assert login.status_code == 200, login.text
        responses = race_refreshes(url, login.json()["refresh_token"], 20)
    successors = {r.json()["refresh_token"] for r in responses if r.status_code == 200}
    assert len(successors) == 1
    assert all(r.json()["error"] == "invalid_grant" for r in responses if r.status_code != 200)
    types = [e.type for e in EventStore(pool).read_all(START, 1000)]
    assert types.count("RefreshTokenRotated") == 1
    assert "RefreshTokenReuseDetected" not in types


@pytest.mark.slow
def test_serve_demo_prints_a_walkthrough_that_works(db_url: str) -> None:
    shared = ("--demo", "--demo-on-shared-database")
    env = {"LEDGER_DATABASE_URL": db_url, "LEDGER_REFRESH_GRACE": "1s"}
    with serving(*shared, env=env) as (url, process):
        form = {"grant_type": "password", "client_id": "demo-spa", "username": "demo"}
        login = requests.post(
            f"{url}/oauth/token", data={**form, "password": "demo-password"}, timeout=30
        )
        assert login.status_code == 200, login.text
        # The walk-through, run as printed: the replay after the grace is caught, and the
        # code-flow script logs in through the login page and gets tokens.
        walkthrough = demo_walkthrough(url, timedelta(seconds=1))
        commands = walkthrough.split("\n", 1)[1]  # after the line naming the demo accounts
        ran = subprocess.run(
            ["bash", "-e", "-c", commands], capture_output=True, text=True, timeout=90
        )
        assert ran.returncode == 0, ran.stderr
        assert "refresh token reuse detected" in ran.stdout
        assert json.loads(ran.stdout[ran.stdout.rindex("{\n") :])["token_type"] == "Bearer"
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert walkthrough in output
    assert "sleep 2\n" in walkthrough
    assert "Authorization: Bearer $ACCESS" in output
    assert "warning: demo user 'demo' with the password 'demo-password'" in output
    assert '"POST /oauth/token HTTP/1.1" 200' not in output  # no access log unless asked for


@pytest.mark.slow
def test_serve_logs_each_request_when_the_access_log_is_on(db_url: str) -> None:
    env = {"LEDGER_DATABASE_URL": db_url, "LEDGER_ACCESS_LOG": "true"}
    with serving(env=env) as (url, process):
        assert requests.get(f"{url}/.well-known/jwks.json", timeout=30).status_code == 200
        listing = requests.get(f"{url}/audit/events?limit=5&secret-looking=abc123", timeout=30)
        assert listing.status_code == 401
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert '"GET /.well-known/jwks.json HTTP/1.1" 200' in output
    # Hardening finding 11: the access log never shows a query string.
    assert '"GET /audit/events HTTP/1.1" 401' in output
    assert "abc123" not in output


@pytest.mark.slow
def test_rotating_x_forwarded_for_values_neither_escape_the_throttle_nor_reach_the_events(
    db_url: str, pool: ConnectionPool, accounts: Accounts
) -> None:
    # Hardening finding 3: uvicorn trusted X-Forwarded-For from 127.0.0.1, so any local process
    # picked its own address: sixty logins never met the throttle, and events recorded the lie.
    env = {"LEDGER_DATABASE_URL": db_url, "LEDGER_ADDRESS_LOGIN_LIMIT": "5"}
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": "no"}
    with serving(env=env) as (url, _):
        statuses = [
            requests.post(
                f"{url}/oauth/token",
                data=form,
                headers={"X-Forwarded-For": f"not-an-ip-{n}"},
                timeout=30,
            ).status_code
            for n in range(6)
        ]
    assert statuses == [400] * 5 + [429]
    failures = [e for e in EventStore(pool).read_all(START, 100) if e.type == "LoginFailed"]
    assert {(e.data["ip"], e.metadata.get("peer")) for e in failures} == {("127.0.0.1", None)}


def test_serve_demo_on_a_shared_database_is_refused_unless_asked_for(
    db_url: str, pool: ConnectionPool
) -> None:
    # Hardening finding 12: the demo's published password would stay on a shared database.
    result = run("serve", "--demo", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "--demo-on-shared-database" in result.stderr
    assert Accounts(pool).user("demo") is None


def test_an_invalid_setting_stops_start_up_naming_it() -> None:
    result = run("serve", env={"LEDGER_IDLE_TIMEOUT": "ten minutes"})
    assert result.returncode == 2
    assert "LEDGER_IDLE_TIMEOUT" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_on_the_embedded_default_stops_its_server_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    with serving(env={"LEDGER_DATA_DIR": str(data_dir)}) as (url, process):
        metadata = requests.get(f"{url}/.well-known/oauth-authorization-server", timeout=30)
        assert metadata.json()["issuer"] == url  # LEDGER_ISSUER defaults to where it listens
        assert is_embedded_running(data_dir)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert not is_embedded_running(data_dir)
