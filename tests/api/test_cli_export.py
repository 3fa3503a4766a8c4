"""`session-ledger export` and `import`, run as real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest

from ledger.db import open_pool
from ledger.events import LoginFailed
from ledger.store import EventStore, Stream
from tests.api.test_cli import run
from tests.ledger.test_export import T0, stored_rows, write_history
from tests.ledger.test_export import empty_db_url as empty_db_url  # a fixture


@pytest.fixture
def exported(store: EventStore, db_url: str, tmp_path: Path) -> Path:
    """A JSONL export of a small history, written by the command."""
    write_history(store, sessions=2)
    path = tmp_path / "ledger.jsonl"
    result = run(
        "export", "--format", "jsonl", "-o", str(path), env={"LEDGER_DATABASE_URL": db_url}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported 10 events to {path}"
    assert "10/10 events" in result.stderr  # the progress line: done of total, rate, time left
    assert "/s" in result.stderr
    return path


def test_export_then_import_into_an_empty_database_then_verify_passes(
    exported: Path, db_url: str, empty_db_url: str
) -> None:
    env = {"LEDGER_DATABASE_URL": empty_db_url}
    result = run("import", str(exported), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported 10 events from {exported}\nrebuilt the projections")
    assert "accounts (users, clients) and keys are not part of an export" in result.stderr
    verified = run("verify", env=env)
    assert verified.returncode == 0, verified.stderr
    assert "every hash chain holds" in verified.stdout
    # The projections came with it: nothing to rebuild, and the sessions are there.
    checked = run("rebuild", "--check", env=env)
    assert checked.returncode == 0, checked.stdout
    assert "sessions: 0 row(s) differ" in checked.stdout
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (2,)
    hashes = [row["hash"] for row in stored_rows(empty_db_url)]
    assert hashes == [row["hash"] for row in stored_rows(db_url)]


def test_export_parquet_with_filters_reads_back(
    store: EventStore, db_url: str, tmp_path: Path
) -> None:
    write_history(store, sessions=3)
    path = tmp_path / "ledger.parquet"
    result = run(
        "export", "--format", "parquet", "-o", str(path), "--since", "2026-03-01T11:00",
        "--until", "2026-03-01T12:00:00+00:00", "--type", "SessionStarted", "--type",
        "SessionEnded", env={"LEDGER_DATABASE_URL": db_url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(path).to_pylist()
    assert [(r["stream_id"], r["version"], r["type"]) for r in rows] == [
        ("session:s-2", 1, "SessionStarted"),
        ("session:s-2", 4, "SessionEnded"),
    ]


def test_export_refuses_an_existing_file_unless_forced(
    store: EventStore, db_url: str, tmp_path: Path
) -> None:
    write_history(store, sessions=1)
    path = tmp_path / "ledger.csv"
    path.write_text("keep me")
    args = ("export", "--format", "csv", "-o", str(path))
    refused = run(*args, env={"LEDGER_DATABASE_URL": db_url})
    assert refused.returncode == 1
    assert "exists; pass --force" in refused.stderr
    assert path.read_text() == "keep me"
    forced = run(*args, "--force", env={"LEDGER_DATABASE_URL": db_url})
    assert forced.returncode == 0, forced.stderr
    assert path.read_text().startswith("position,stream_id,")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--type", "Nope"), "unknown event type(s) Nope; known types: SessionStarted"),
        (("--since", "yesterday"), "'yesterday' is not an ISO 8601"),
        (("--since", "2026-03-02", "--until", "2026-03-01"), "since must be before until"),
    ],
)
def test_export_with_bad_options_exits_2(
    db_url: str, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    out = tmp_path / "out.jsonl"
    result = run(
        "export", "--format", "jsonl", "-o", str(out), *args, env={"LEDGER_DATABASE_URL": db_url}
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_with_an_unreachable_database_exits_2(tmp_path: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    result = run(
        "export", "--format", "csv", "-o", str(tmp_path / "x.csv"), env={"LEDGER_DATABASE_URL": url}
    )
    assert result.returncode == 2
    assert result.stderr.startswith("session-ledger: PostgreSQL is unavailable")


def test_import_of_a_tampered_file_exits_1_and_writes_nothing(
    exported: Path, empty_db_url: str
) -> None:
    lines = exported.read_text("utf-8").splitlines()
    row = json.loads(lines[1])
    row["metadata"]["ip"] = "203.0.113.9"
    lines[1] = json.dumps(row)
    exported.write_text("\n".join(lines) + "\n", "utf-8")
    result = run("import", str(exported), env={"LEDGER_DATABASE_URL": empty_db_url})
    assert result.returncode == 1
    assert "stream 'session:s-1' version 2: the recomputed hash" in result.stderr
    assert "nothing was imported" in result.stderr
    assert stored_rows(empty_db_url) == []


def test_import_of_a_malformed_line_exits_1_naming_it(exported: Path, empty_db_url: str) -> None:
    with exported.open("a", encoding="utf-8") as file:
        file.write('{"stream_id": "x"\n')
    result = run("import", str(exported), env={"LEDGER_DATABASE_URL": empty_db_url})
    assert result.returncode == 1
    assert f"{exported}: line 11: not JSON" in result.stderr
    assert stored_rows(empty_db_url) == []


def test_import_refuses_a_ledger_with_events_unless_appending(
    exported: Path, db_url: str, empty_db_url: str
) -> None:
    with open_pool(empty_db_url, max_size=1) as pool:
        failed = LoginFailed(occurred_at=T0, reason="wrong_password", ip=None, user_agent=None)
        EventStore(pool).append(Stream("principal:other", "principal"), 0, [failed])
    env = {"LEDGER_DATABASE_URL": empty_db_url}
    refused = run("import", str(exported), env=env)
    assert refused.returncode == 1
    assert "already holds events" in refused.stderr
    appended = run("import", str(exported), "--append", env=env)
    assert appended.returncode == 0, appended.stderr
    assert len(stored_rows(empty_db_url)) == 11
    assert run("verify", env=env).returncode == 0


def test_import_appending_streams_that_exist_exits_1_and_writes_nothing(
    exported: Path, db_url: str
) -> None:
    again = run("import", str(exported), "--append", env={"LEDGER_DATABASE_URL": db_url})
    assert again.returncode == 1
    assert "stream 'session:s-1': version 1 cannot follow version 4" in again.stderr
    assert len(stored_rows(db_url)) == 10


def test_an_import_whose_events_no_projection_can_read_says_so(
    store: EventStore, tmp_path: Path, empty_db_url: str, db_url: str
) -> None:
    store.append(Stream("odd", "session"), 0, [LoginFailed(occurred_at=T0, reason="x", ip=None,
                                                           user_agent=None)])  # fmt: skip
    path = tmp_path / "odd.jsonl"
    exported = run(
        "export", "--format", "jsonl", "-o", str(path), env={"LEDGER_DATABASE_URL": db_url}
    )
    assert exported.returncode == 0, exported.stderr
    result = run("import", str(path), env={"LEDGER_DATABASE_URL": empty_db_url})
    assert result.returncode == 1
    assert "the events are imported, but rebuilding sessions failed" in result.stderr
    assert "Traceback" not in result.stderr
