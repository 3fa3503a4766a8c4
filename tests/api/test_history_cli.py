"""`project`, `rebuild` and `replay` as a user runs them, on history made through the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta

import jwt
import psycopg
import pytest

from api.cli.history import change_line
from projections.replay import Change, Ending
from tests.api.conftest import LiveServer
from tests.api.test_cli import EXECUTABLE, run

Admin = psycopg.Connection[tuple[object, ...]]


def make_history(live: LiveServer) -> dict[str, str]:
    """From 09:00: ada's first session is refreshed and revoked, bob's goes idle after 09:05,
    ada's third is refreshed at 09:29; then a failed login of ada's at 09:40."""
    first = live.login()
    live.clock.advance(timedelta(minutes=5))
    second = live.login(username="bob")
    live.clock.advance(timedelta(minutes=5))
    first = live.refresh(first["refresh_token"]).json()
    live.post("/oauth/revoke", data={"token": first["refresh_token"], "client_id": "spa"})
    third = live.login()
    live.clock.advance(timedelta(minutes=19))
    assert live.refresh(third["refresh_token"]).status_code == 200
    live.clock.advance(timedelta(minutes=11))
    live.post(
        "/oauth/token",
        data={"grant_type": "password", "client_id": "spa", "username": "ada", "password": "x"},
    )
    return {
        name: jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"]
        for name, tokens in (("first", first), ("second", second), ("third", third))
    }


def cli_env(live: LiveServer) -> dict[str, str]:
    """The live server's database and session policy, for the command line."""
    return {
        "LEDGER_DATABASE_URL": live.settings.database_url or "",
        "LEDGER_IDLE_TIMEOUT": "30m",
        "LEDGER_ABSOLUTE_TIMEOUT": "2h",
    }


@pytest.fixture
def history(live: LiveServer) -> dict[str, str]:
    return make_history(live)


def test_project_once_fills_the_catch_up_projections(
    live: LiveServer, history: dict[str, str], admin: Admin
) -> None:
    result = run("project", "--once", env=cli_env(live))
    assert result.returncode == 0, result.stderr
    assert "user_summary:" in result.stdout
    assert "0 behind" in result.stdout
    rows = admin.execute(
        "SELECT user_name, sessions_started, open_sessions, failures FROM user_summary"
        " ORDER BY user_name"
    ).fetchall()
    assert rows == [("ada", 2, 1, 1), ("bob", 1, 1, 0)]
    hourly = admin.execute("SELECT logins, refreshes, revocations FROM hourly_stats").fetchall()
    assert hourly == [(3, 2, 1)]


def test_rebuild_check_finds_a_row_changed_by_hand_and_rebuild_repairs_it(
    live: LiveServer, history: dict[str, str], admin: Admin
) -> None:
    env = cli_env(live)
    clean = run("rebuild", "--check", env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    admin.execute("UPDATE sessions SET generation = 7 WHERE session_id = %s", (history["third"],))
    drifted = run("rebuild", "sessions", "--check", env=env)
    assert drifted.returncode == 1
    assert f"sessions [{history['third']}]: generation: live 7, rebuilt 2" in drifted.stdout
    assert "9/9 events" in drifted.stderr  # the progress bar
    repaired = run("rebuild", "sessions", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert run("rebuild", "sessions", "--check", env=env).returncode == 0


def test_rebuild_names_unknown_projections(live: LiveServer) -> None:
    result = run("rebuild", "nope", env=cli_env(live))
    assert result.returncode == 2
    assert "unknown projection 'nope'" in result.stderr


def test_replay_as_of_shows_a_session_through_its_life(
    live: LiveServer, history: dict[str, str]
) -> None:
    env = cli_env(live)
    sid = history["second"]  # bob logged in at 09:05 and went idle: 30 minutes later it ended

    def at(time: str) -> str:
        result = run("replay", "--as-of", time, "--session", sid, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "not started" in at("2026-03-01T09:04:00Z")
    assert f"{sid}: valid; user bob; idle 300s; generation 1" in at("2026-03-01T09:10:00")
    assert f"{sid}: valid; user bob; idle 1740s" in at("2026-03-01T09:34:00Z")
    assert f"{sid}: idle_timeout" in at("2026-03-01T09:35:00Z")
    # Idle time stops at the end: the 30 minutes it took, however much later one looks.
    assert f"{sid}: idle_timeout; user bob; idle 1800s" in at("2026-03-01T12:00:00Z")


def test_replay_as_of_for_a_user_leaves_out_the_sessions_that_start_later(
    live: LiveServer, history: dict[str, str]
) -> None:
    result = run("replay", "--as-of", "2026-03-01T09:02:00Z", "--user", "ada", env=cli_env(live))
    assert result.returncode == 0, result.stderr
    assert history["first"] in result.stdout
    assert history["third"] not in result.stdout  # it started at 09:10
    assert "not started" not in result.stdout


def test_a_what_if_end_still_to_come_is_projected_not_actual() -> None:
    at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    change = Change("s-1", "ada", Ending(at, "idle_timeout"), Ending(at, "idle_timeout"))
    assert " actual idle_timeout at 2026-03-01T09:00:00+00:00" in change_line(
        "earlier", change, at + timedelta(seconds=1)
    )
    assert " projected idle_timeout at" in change_line("earlier", change, at - timedelta(hours=1))


def test_replay_what_if(live: LiveServer, history: dict[str, str]) -> None:
    env = cli_env(live)
    same = run("replay", "--what-if", "idle=30m", env=env)
    assert same.returncode == 0, same.stderr
    assert "3 sessions replayed: 0 would have ended earlier, 0 later" in same.stdout
    shorter = run("replay", "--what-if", "idle=20m", env=env)
    # bob idled 30 minutes; the third session is still open: both would end 10 minutes sooner.
    assert "2 would have ended earlier, 0 later" in shorter.stdout
    assert f"earlier: {history['second']} (bob) actual idle_timeout" in shorter.stdout
    assert f"earlier: {history['third']} (ada)" in shorter.stdout
    assert history["first"] not in shorter.stdout  # it ended by logout after 10 minutes
    bad = run("replay", "--what-if", "sleepy=5m", env=env)
    assert bad.returncode == 2
    assert "expected NAME=DURATION" in bad.stderr


@pytest.mark.slow
def test_project_started_in_the_background_stops_on_sigint(db_url: str) -> None:
    """A shell starts a background job with SIGINT ignored; `project` stops on it all the same."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    process = subprocess.Popen(
        [EXECUTABLE, "project"],
        env={**clean, "LEDGER_DATABASE_URL": db_url},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert process.stderr is not None
        assert "projecting; Ctrl-C stops" in process.stderr.readline()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()


def test_history_of_a_session_is_its_timeline_with_the_chain_checked(
    live: LiveServer, history: dict[str, str]
) -> None:
    env = cli_env(live)
    first = history["first"]  # ada's: logged in at 09:00, refreshed at 09:10, then revoked
    result = run("history", "--session", first, "--json", env=env)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    events = body["events"]
    started, ended = events[0], events[-1]
    assert (started["type"], started["ip"]) == ("SessionStarted", "127.0.0.1")
    assert started["occurred_at"] == "2026-03-01T09:00:00.000000Z"
    (rotated,) = [e for e in events if e["type"] == "RefreshTokenRotated"]
    assert rotated["generation"] == 2
    assert (ended["type"], ended["reason"]) == ("SessionEnded", "logout")
    count = len(events)
    assert body["chain"] == {"holds": True, "events": count, "streams": 1, "broken": []}
    table = run("history", "--session", first, env=env)
    assert table.returncode == 0, table.stderr
    assert "RefreshTokenRotated" in table.stdout
    assert f"hash chains hold: {count} event(s) in 1 stream(s)" in table.stdout


def test_history_of_a_user_holds_their_failed_logins_and_every_session(
    live: LiveServer, history: dict[str, str]
) -> None:
    result = run("history", "--user", "ada", "--json", env=cli_env(live))
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)["events"]
    assert {e["stream_id"] for e in events} == {
        "principal:ada",
        f"session:{history['first']}",
        f"session:{history['third']}",
    }
    times = [e["occurred_at"] for e in events]
    assert times == sorted(times)
    assert events[-1]["type"] == "LoginFailed"
    since = run("history", "--user", "ada", "--since", "2026-03-01T09:30:00Z", "--json",
                env=cli_env(live))  # fmt: skip
    assert [e["type"] for e in json.loads(since.stdout)["events"]] == ["LoginFailed"]


def test_history_names_a_broken_chain_and_exits_1(
    live: LiveServer, history: dict[str, str], admin: Admin
) -> None:
    admin.execute("ALTER TABLE events DISABLE TRIGGER USER")
    admin.execute(
        "UPDATE events SET data = jsonb_set(data, '{reason}', '\"idle_timeout\"')"
        " WHERE type = 'SessionEnded' AND stream_id = %s",
        (f"session:{history['first']}",),
    )
    result = run("history", "--session", history["first"], env=cli_env(live))
    assert result.returncode == 1
    assert "BROKEN:" in result.stdout
    assert "hash does not match content" in result.stdout


def test_history_needs_one_of_session_and_user(live: LiveServer) -> None:
    result = run("history", env=cli_env(live))
    assert result.returncode == 2
    assert "exactly one of --session and --user" in result.stderr
