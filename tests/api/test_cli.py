"""The command line, run as a real subprocess, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from ledger.events import ActivityRecorded, SessionEnded
from ledger.store import EventStore, Stream

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
EXECUTABLE = shutil.which("session-ledger") or str(Path(sys.executable).parent / "session-ledger")


def run(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return subprocess.run(
        [EXECUTABLE, *args],
        env={**clean, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_verify_exits_0_when_every_chain_holds(store: EventStore, db_url: str) -> None:
    store.append(Stream("s-1", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    result = run("verify", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert "every hash chain holds" in result.stdout


def test_verify_exits_1_naming_a_tampered_stream_and_version(
    store: EventStore, db_url: str, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    store.append(Stream("s-1", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    store.append(Stream("s-2", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    store.append(Stream("s-2", "session"), 1, [SessionEnded(occurred_at=T0, reason="logout")])
    admin.execute("ALTER TABLE events DISABLE TRIGGER USER")
    admin.execute(
        "UPDATE events SET data = '{\"reason\": \"idle\"}' WHERE stream_id = 's-2' AND version = 2"
    )
    result = run("verify", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 1
    assert "stream s-2 version 2" in result.stdout
    assert "s-1" not in result.stdout


def test_bad_database_url_exits_2_with_one_clear_line() -> None:
    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    result = run("verify", env={"LEDGER_DATABASE_URL": url})
    assert result.returncode == 2
    assert result.stderr.startswith("session-ledger: PostgreSQL is unavailable")
    assert "Traceback" not in result.stderr


def test_empty_setting_is_named_at_start_up() -> None:
    result = run("db", "init", env={"LEDGER_DATABASE_URL": " "})
    assert result.returncode == 2
    assert "LEDGER_DATABASE_URL is set but empty" in result.stderr


def test_db_init_applies_the_schema(pg_server_url: str, db_url: str) -> None:
    result = run("db", "init", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stdout


@pytest.fixture
def embedded_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "ledger-data" / "pgdata"
    yield data_dir
    run("db", "stop", env={"LEDGER_DATA_DIR": str(data_dir)})


@pytest.mark.slow
def test_db_url_starts_the_embedded_server_and_reports_a_working_url(embedded_dir: Path) -> None:
    env = {"LEDGER_DATA_DIR": str(embedded_dir)}
    result = run("db", "url", env=env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        assert row == (1,)
        server_version = conn.info.server_version
    assert server_version >= 160000
    assert (embedded_dir / "PG_VERSION").exists()

    again = run("db", "url", env=env)
    assert again.stdout.strip() == url

    stopped = run("db", "stop", env=env)
    assert stopped.stdout.strip() == "stopped"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()
