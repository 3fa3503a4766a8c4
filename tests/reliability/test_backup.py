"""Backup and restore: pg_dump a ledger with history, pg_restore it into a new database, and the
restored copy passes `session-ledger verify` and `rebuild --check` and keeps every event."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pgserver
import psycopg
import pytest
import requests
from psycopg import sql
from psycopg.conninfo import make_conninfo

from api.http.app import create_app
from tests.api import conftest as api_fixtures
from tests.api.conftest import CHEAP_HASHER, LiveServer, serve_in_thread
from tests.api.test_cli import run

accounts = api_fixtures.accounts
live_factory = api_fixtures.live_factory
live = api_fixtures.live

# The embedded server's own client tools, beside its postgres binary.
PGSERVER_BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"
EVENTS = (
    "SELECT stream_id, version, type, data, metadata, hash FROM events ORDER BY stream_id, version"
)


def pg_tool(name: str, server_major: int) -> str:
    """The pg_dump or pg_restore to use: one of the server's major version, else the newest
    available (pg_dump refuses servers newer than itself)."""
    found: dict[int, str] = {}
    for candidate in (shutil.which(name), str(PGSERVER_BIN / name)):
        if candidate and Path(candidate).exists():
            version = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, check=True
            ).stdout
            match = re.search(r"\) (\d+)", version)
            assert match, version
            found.setdefault(int(match.group(1)), candidate)
    assert found, f"no {name} on PATH or in {PGSERVER_BIN}"
    return found.get(server_major) or found[max(found)]


@pytest.fixture
def restore_url(pg_server_url: str) -> Iterator[str]:
    """An empty database (no schema) on the same server, to restore into."""
    name = f"ledger_restore_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    yield make_conninfo(pg_server_url, dbname=name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


def make_history(live: LiveServer) -> str:
    """Logins, rotations, a logout and failed logins; returns a refresh token still live."""
    ada = live.login("ada")
    for _ in range(3):
        response = live.refresh(ada["refresh_token"])
        assert response.status_code == 200, response.text
        ada = response.json()
    bob = live.login("bob")
    assert live.post("/oauth/revoke", data={"client_id": "spa", "token": bob["refresh_token"]}).ok
    form = {"grant_type": "password", "client_id": "spa", "username": "bob", "password": "wrong"}
    for _ in range(2):
        assert live.post("/oauth/token", data=form).status_code == 400
    refresh_token: str = ada["refresh_token"]
    return refresh_token


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def test_a_pg_dump_restored_into_a_new_database_verifies_and_keeps_every_event(
    live: LiveServer, db_url: str, restore_url: str, tmp_path: Path
) -> None:
    held = make_history(live)
    major = int(rows(db_url, "SHOW server_version_num")[0][0]) // 10000  # type: ignore[call-overload]
    dump = tmp_path / "ledger.dump"

    subprocess.run(
        [pg_tool("pg_dump", major), "--format=custom", f"--file={dump}", f"--dbname={db_url}"],
        check=True,
        timeout=120,
    )
    subprocess.run(
        [pg_tool("pg_restore", major), "--exit-on-error", f"--dbname={restore_url}", str(dump)],
        check=True,
        timeout=120,
    )

    env = {"LEDGER_DATABASE_URL": restore_url}
    verified = run("verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "every hash chain holds" in verified.stdout
    checked = run("rebuild", "--check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "sessions: 0 row(s) differ" in checked.stdout
    original = rows(db_url, EVENTS)
    assert len(original) == 8  # 2 logins, 3 rotations, a revocation, 2 failures
    assert rows(restore_url, EVENTS) == original
    assert_restored_server_honours(held, live, restore_url)


def assert_restored_server_honours(refresh_token: str, live: LiveServer, url: str) -> None:
    """The restored database carries the keys: a refresh token from before the backup works."""
    settings = dataclasses.replace(live.settings, database_url=url)
    app = create_app(settings, url, clock=live.clock, hasher=CHEAP_HASHER)
    base, stop = serve_in_thread(app)
    try:
        form = {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": refresh_token}
        response = requests.post(f"{base}/oauth/token", data=form, timeout=30)
        assert response.status_code == 200, response.text
    finally:
        stop()
