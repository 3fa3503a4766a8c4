"""The catch-up runner applies every event exactly once: across a crash mid-batch, writers that
commit out of position order, and two runners at once; and it reports its lag."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import timedelta

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from ledger.clock import ManualClock
from ledger.errors import DatabaseUnavailable, StorageError
from ledger.events import (
    LoginFailed,
    PrincipalLocked,
    RefreshTokenReuseDetected,
    RefreshTokenRotated,
    SessionEnded,
    SessionStarted,
)
from ledger.records import RecordedEvent
from ledger.store import EventStore
from projections.sql.catalog import CATCH_UP, PROJECTIONS, Projection
from projections.sql.rebuild import rebuild
from projections.sql.runner import Lag, Runner, apply_batch, checkpoint, lag
from tests.projections.histories import (
    T0,
    Admin,
    Connection,
    Writer,
    all_events,
    applied_times,
    counting_projection,
    create_counting_table,
    positions,
    write_varied_history,
)
from tests.waiting import wait_until


class Crash(Exception):
    """The runner dying in the middle of a batch."""


def crashing_in_second_batch(projection: Projection, how: str, admin: Admin) -> Projection:
    """The projection, but its second batch does half its work and then the runner dies."""
    calls = 0

    def apply(
        store: EventStore,
        conn: Connection,
        events: Sequence[RecordedEvent],
        tables: Mapping[str, str],
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            projection.apply(store, conn, events, tables)
            return
        if how == "at_checkpoint":  # all the rows are written; storing the checkpoint fails
            projection.apply(store, conn, events, tables)
            conn.execute("SELECT set_config('test.crash', 'on', false)")
            return
        projection.apply(store, conn, events[: len(events) // 2 + 1], tables)
        if how == "exception":
            raise Crash
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        conn.execute("SELECT 1")  # the server process is gone with the open transaction

    return dataclasses.replace(projection, apply=apply)


def assert_no_drift(db_url: str, store: EventStore, projections: Sequence[Projection]) -> None:
    for projection in projections:
        drift = rebuild(db_url, store, projection, check=True)
        assert drift == [], (projection.name, [str(d) for d in drift])


def assert_counts_match_events(admin: Admin, events: Sequence[RecordedEvent]) -> None:
    """The catch-up tables count each event once (sums over all rows against the log)."""
    types = Counter(e.type for e in events)
    endings = Counter(e.event.reason for e in events if isinstance(e.event, SessionEnded))
    row = admin.execute(
        "SELECT sum(logins), sum(login_failures), sum(refreshes), sum(reuse_detections),"
        " sum(revocations), sum(idle_expiries), sum(absolute_expiries),"
        " sum(cardinality(session_seconds)) FROM hourly_stats"
    ).fetchone()
    assert row is not None
    assert tuple(int(str(v)) for v in row) == (
        types[SessionStarted.type_name],
        types[LoginFailed.type_name],
        types[RefreshTokenRotated.type_name],
        types[RefreshTokenReuseDetected.type_name],
        endings["logout"],
        endings["idle_timeout"],
        endings["absolute_timeout"],
        types[SessionEnded.type_name],
    )
    summary = admin.execute(
        "SELECT sum(sessions_started), sum(failures), sum(open_sessions) FROM user_summary"
    ).fetchone()
    assert summary is not None
    started, failed = types[SessionStarted.type_name], types[LoginFailed.type_name]
    ended = types[SessionEnded.type_name]
    assert tuple(int(str(v)) for v in summary) == (started, failed, started - ended)
    rows = admin.execute("SELECT kind, count(*) FROM alerts GROUP BY kind").fetchall()
    kinds = {str(kind): int(str(count)) for kind, count in rows}
    assert kinds == {
        "reuse_detected": types[RefreshTokenReuseDetected.type_name],
        "lockout": types[PrincipalLocked.type_name],
        "failure_burst": 1,
    }


CRASH_ON_CHECKPOINT = """
CREATE FUNCTION crash_on_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('test.crash', true) = 'on' THEN
        RAISE EXCEPTION 'the runner died before storing its checkpoint';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER crash_on_checkpoint BEFORE UPDATE ON projection_checkpoints
    FOR EACH ROW EXECUTE FUNCTION crash_on_checkpoint();
"""
ERRORS: dict[str, type[Exception]] = {
    "exception": Crash,
    "terminated": DatabaseUnavailable,
    "at_checkpoint": StorageError,
}


@pytest.mark.parametrize("how", list(ERRORS))
def test_runner_killed_mid_batch_redoes_the_batch_and_nothing_twice(
    how: str, db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    create_counting_table(admin)
    admin.execute(CRASH_ON_CHECKPOINT)
    write_varied_history(Writer(pool, store, ManualClock(T0)))
    events = all_events(store)
    projections = [counting_projection(), *CATCH_UP]
    for projection in projections:
        crashing = crashing_in_second_batch(projection, how, admin)
        with pytest.raises(ERRORS[how]):
            Runner(db_url, pool, [crashing], batch_size=5).run_once()
        # Only the first batch committed: its checkpoint, and rows that match a rebuild to it.
        assert checkpoint(admin, projection.name) == events[4].checkpoint
    assert applied_times(admin) == {e.position: 1 for e in events[:5]}
    assert_no_drift(db_url, store, CATCH_UP)

    applied = Runner(db_url, pool, projections, batch_size=5).run_once()

    assert applied == {p.name: len(events) - 5 for p in projections}
    assert applied_times(admin) == {e.position: 1 for e in events}
    assert_no_drift(db_url, store, CATCH_UP)
    assert_counts_match_events(admin, events)


@pytest.mark.parametrize("first_xid", ["late_writer", "early_committer"])
def test_runner_never_skips_an_event_whose_transaction_commits_late(
    first_xid: str, db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    create_counting_table(admin)
    writer = Writer(pool, store, ManualClock(T0))
    s1, s2 = writer.login("ann"), writer.login("bo")
    assert s1 is not None
    assert s2 is not None
    runner = Runner(db_url, pool, [counting_projection(), *CATCH_UP], batch_size=2)
    assert runner.run_once()["counting"] == 2
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b:
        if first_xid == "early_committer":
            b.execute("SELECT pg_current_xact_id()")  # B takes its transaction id before A
        writer.advance(timedelta(minutes=2))
        writer.activity(s1, conn=a)  # A: the lower position, still uncommitted
        writer.refresh_current(s2, conn=b)  # B: higher positions
        a_pos, a_xid = own_last_event(a)
        b.commit()
        b_pos, b_xid = own_last_event(b)
        assert a_pos < b_pos
        assert (a_xid < b_xid) == (first_xid == "late_writer")

        runner.run_once()
        during = applied_times(admin)
        assert a_pos not in during
        # B's events lie below the horizon only when B's transaction began before A's.
        assert (b_pos in during) == (first_xid == "early_committer")
        a.commit()

    runner.run_once()

    assert applied_times(admin) == dict.fromkeys(positions(admin), 1)
    assert_no_drift(db_url, store, CATCH_UP)


def own_last_event(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int]:
    """The position and transaction id of the newest event this connection can see."""
    row = conn.execute(
        "SELECT position, tx_id::text::bigint FROM events ORDER BY position DESC LIMIT 1"
    ).fetchone()
    assert row is not None
    return int(str(row[0])), int(str(row[1]))


def test_two_runners_at_once_apply_every_event_exactly_once(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    create_counting_table(admin)
    writer = Writer(pool, store, ManualClock(T0))
    writing_done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for n in range(15):
                session_id = writer.login(f"user{n % 4}", ip=f"203.0.113.{n % 3}")
                assert session_id is not None
                writer.advance(timedelta(minutes=2))
                writer.refresh_current(session_id)
                writer.fail(f"user{n % 4}", ip="203.0.113.99")
                if n % 3 == 0:
                    writer.logout(session_id)
        except BaseException as e:
            errors.append(e)
        finally:
            writing_done.set()

    def run(tag: str) -> None:
        counting = [counting_projection(tag=tag)]
        order = [*counting, *CATCH_UP] if tag == "r1" else [*CATCH_UP, *counting]
        runner = Runner(db_url, pool, order, batch_size=3)
        try:
            while not writing_done.is_set():
                runner.run_once()
            runner.run_once()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write)]
    threads += [threading.Thread(target=run, args=(tag,)) for tag in ("r1", "r2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    Runner(db_url, pool, [counting_projection(tag="final"), *CATCH_UP]).run_once()

    events = all_events(store)
    assert applied_times(admin) == {e.position: 1 for e in events}
    assert_no_drift(db_url, store, CATCH_UP)


def test_second_runner_stands_by_while_the_first_holds_the_projection(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    create_counting_table(admin)
    write_varied_history(Writer(pool, store, ManualClock(T0)))
    entered, release = threading.Event(), threading.Event()

    def hold(conn: Connection, events: Sequence[RecordedEvent]) -> None:
        entered.set()
        assert release.wait(timeout=30)

    first = Runner(db_url, pool, [counting_projection(tag="r1", before=hold)])
    result: dict[str, int] = {}
    errors: list[BaseException] = []

    def run_first() -> None:
        try:
            result.update(first.run_once())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert entered.wait(timeout=30)
        second = Runner(db_url, pool, [counting_projection(tag="r2")])
        assert second.run_once() == {}  # it skipped the projection: the first one holds it
    finally:
        release.set()
        thread.join(timeout=30)

    assert not errors, errors
    assert result == {"counting": len(positions(admin))}
    assert applied_times(admin) == dict.fromkeys(positions(admin), 1)
    batches = {
        str(b) for (b,) in admin.execute("SELECT DISTINCT split_part(batch, ':', 1) FROM applied")
    }
    assert batches == {"r1"}


def test_concurrent_batches_queue_on_the_checkpoint_and_never_overlap(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    """Even without the advisory lock, two batches of one projection cannot read the same events:
    the second waits for the first's checkpoint row and reads after the checkpoint it stored."""
    create_counting_table(admin)
    writer = Writer(pool, store, ManualClock(T0))
    first_sessions = [writer.login(f"u{n}") for n in range(4)]
    entered, release = threading.Event(), threading.Event()

    def hold(conn: Connection, events: Sequence[RecordedEvent]) -> None:
        entered.set()
        assert release.wait(timeout=30)

    counts: dict[str, int] = {}
    pids: dict[str, int] = {}
    errors: list[BaseException] = []

    def batch(tag: str, projection: Projection) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                pids[tag] = conn.info.backend_pid
                counts[tag] = apply_batch(conn, store, projection, 100)
        except BaseException as e:
            errors.append(e)

    admin.execute(
        "INSERT INTO projection_checkpoints (name, tx_id, position) VALUES ('counting', 0, 0)"
    )
    one = threading.Thread(target=batch, args=("one", counting_projection(tag="one", before=hold)))
    two = threading.Thread(target=batch, args=("two", counting_projection(tag="two")))
    one.start()
    try:
        assert entered.wait(timeout=30)
        two.start()
        wait_until(
            lambda: is_waiting_on_lock(admin, pids.get("two")),
            timeout=10,
            what="the second batch to wait",
        )
        for session_id in first_sessions:  # committed while the first batch is open
            assert session_id is not None
            writer.logout(session_id)
    finally:
        release.set()
        one.join(timeout=30)
        two.join(timeout=30)
    assert not errors, errors
    with psycopg.connect(db_url, autocommit=True) as conn:
        counts["three"] = apply_batch(conn, store, counting_projection(tag="three"), 100)

    assert counts["one"] == 4
    assert counts["two"] + counts["three"] == 4
    assert applied_times(admin) == dict.fromkeys(positions(admin), 1)


def is_waiting_on_lock(admin: Admin, pid: int | None) -> bool:
    if pid is None:
        return False
    row = admin.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return row is not None and row[0] == "Lock"


def test_lag_reports_events_and_seconds_behind_and_zero_after_catching_up(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    write_varied_history(Writer(pool, store, ManualClock(T0)))
    events = all_events(store)
    hourly = PROJECTIONS["hourly_stats"]
    oldest = min(e.recorded_at for e in events)
    now = oldest + timedelta(seconds=90)

    assert lag(store, admin, hourly, now) == Lag(len(events), 90.0)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert apply_batch(conn, store, hourly, 7) == 7
    behind = events[7:]
    expected = (now - min(e.recorded_at for e in behind)).total_seconds()
    assert lag(store, admin, hourly, now) == Lag(len(behind), max(expected, 0.0))
    assert lag(store, admin, hourly, oldest - timedelta(hours=1)) == Lag(len(behind), 0.0)

    Runner(db_url, pool, [hourly]).run_once()

    assert lag(store, admin, hourly, now) == Lag(0, 0.0)
    assert lag(store, admin, PROJECTIONS["alerts"], now).events == len(events)
