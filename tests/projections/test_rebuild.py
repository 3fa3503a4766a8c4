"""Rebuild from events alone: `check` lists every drifted row, a rebuild repairs it, an
interrupted rebuild leaves the live tables as they were, and a catch-up projection's rebuild
hands the runner a checkpoint to continue from."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from ledger.clock import ManualClock
from ledger.records import START, Checkpoint, RecordedEvent
from ledger.store import EventStore
from projections.sql.catalog import CATCH_UP, PROJECTIONS
from projections.sql.inline import load_session
from projections.sql.rebuild import Drift, rebuild
from projections.sql.runner import Runner, apply_batch, checkpoint
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
    snapshot,
    write_varied_history,
)
from tests.waiting import wait_until


class PidRecordingStore(EventStore):
    """The event store, noting which server processes read through it (the rebuild's)."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__(pool)
        self.pids: set[int] = set()

    def read_all(
        self, after: Checkpoint = START, limit: int = 1000, *, conn: Connection | None = None
    ) -> list[RecordedEvent]:
        if conn is not None:
            self.pids.add(conn.info.backend_pid)
        return super().read_all(after, limit, conn=conn)


def backend_gone(admin: Admin, pid: int) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == 0


def assert_nothing_left_behind(admin: Admin, store: PidRecordingStore) -> None:
    """Once the rebuild's server process is gone: no scratch tables, no advisory locks."""
    wait_until(
        lambda: all(backend_gone(admin, pid) for pid in store.pids),
        timeout=10,
        what="the rebuild's server process to exit",
    )
    scratch = admin.execute(r"SELECT relname FROM pg_class WHERE relname LIKE '%\_rebuild'")
    assert scratch.fetchall() == []
    locks = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert locks.fetchone() == (0,)


def history(pool: ConnectionPool, store: EventStore) -> list[str]:
    return write_varied_history(Writer(pool, store, ManualClock(T0)))


def test_check_reports_a_row_changed_by_hand_and_rebuild_repairs_it(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    sessions = history(pool, store)
    target = sessions[2]
    with pool.connection() as conn:
        original = load_session(conn, target, for_update=False)
    assert original is not None
    admin.execute(
        "UPDATE sessions SET generation = 99, last_activity = last_activity + interval '5 minutes'"
        " WHERE session_id = %s",
        (target,),
    )
    before = snapshot(admin, ["sessions"])

    drift = rebuild(db_url, store, PROJECTIONS["sessions"], check=True)

    assert [(d.table, d.key) for d in drift] == [("sessions", (target,))]
    (row,) = drift
    assert row.live is not None
    assert row.rebuilt is not None
    changed = {c for c in row.live if row.live[c] != row.rebuilt[c]}
    assert changed == {"generation", "last_activity"}
    assert (row.live["generation"], row.rebuilt["generation"]) == (99, original.generation)
    assert row.rebuilt["last_activity"] == original.last_activity
    assert row.live["last_activity"] == original.last_activity + timedelta(minutes=5)
    assert "generation: live 99, rebuilt" in str(row)
    assert snapshot(admin, ["sessions"]) == before  # a check changes nothing

    assert rebuild(db_url, store, PROJECTIONS["sessions"]) == []

    with pool.connection() as conn:
        assert load_session(conn, target, for_update=False) == original
    assert rebuild(db_url, store, PROJECTIONS["sessions"], check=True) == []


def test_the_batch_by_batch_session_fold_agrees_with_the_in_memory_one(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    # Without its rebuilder, a sessions rebuild applies apply_sessions batch by batch, loading
    # and saving rows as it goes; with small batches, sessions span many of them.
    history(pool, store)
    batch_by_batch = dataclasses.replace(PROJECTIONS["sessions"], rebuilder=None)
    before = snapshot(admin, ["sessions"])
    assert rebuild(db_url, store, batch_by_batch, check=True, batch_size=3) == []
    assert rebuild(db_url, store, PROJECTIONS["sessions"], check=True, batch_size=3) == []
    admin.execute("UPDATE sessions SET generation = 99")
    drift = rebuild(db_url, store, batch_by_batch, check=True, batch_size=3)
    assert {d.key for d in drift} == {row[0:1] for row in before["sessions"]}
    assert rebuild(db_url, store, batch_by_batch, batch_size=3) == []
    assert snapshot(admin, ["sessions"]) == before


def test_check_lists_every_differing_row_of_every_table(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    sessions = history(pool, store)
    Runner(db_url, pool).run_once()
    admin.execute("DELETE FROM sessions WHERE session_id = %s", (sessions[0],))
    admin.execute(
        "INSERT INTO sessions SELECT 'zz-forged', version, user_name, client_id, scope, started_at,"
        " last_activity, generation, rotations, ip, user_agent, ended_at, end_reason"
        " FROM sessions WHERE session_id = %s",
        (sessions[1],),
    )
    admin.execute("UPDATE principals SET locked_until = NULL WHERE name = 'ada'")
    admin.execute("DELETE FROM alerts WHERE kind = 'lockout'")
    admin.execute("UPDATE address_failures SET alerted_until = NULL")
    admin.execute("UPDATE hourly_stats SET logins = logins + 1 WHERE hour = %s", (T0,))

    def drifted(name: str) -> list[tuple[str, tuple[object, ...], bool, bool]]:
        drift = rebuild(db_url, store, PROJECTIONS[name], check=True)
        return [(d.table, d.key, d.live is None, d.rebuilt is None) for d in drift]

    assert drifted("sessions") == [
        ("sessions", (sessions[0],), True, False),
        ("sessions", ("zz-forged",), False, True),
    ]
    assert drifted("principals") == [("principals", ("ada",), False, False)]
    lockouts = [e.position for e in all_events(store) if e.type == "PrincipalLocked"]
    assert drifted("alerts") == [
        ("alerts", (lockouts[0],), True, False),
        ("address_failures", ("203.0.113.50",), False, False),
    ]
    assert drifted("hourly_stats") == [("hourly_stats", (T0,), False, False)]
    assert drifted("user_summary") == []

    for projection in PROJECTIONS.values():
        assert rebuild(db_url, store, projection) == []
        assert rebuild(db_url, store, projection, check=True) == [], projection.name


def test_check_of_a_catch_up_projection_compares_up_to_its_checkpoint(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    history(pool, store)
    hourly = PROJECTIONS["hourly_stats"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        apply_batch(conn, store, hourly, 10)  # the runner is 10 events in
    assert rebuild(db_url, store, hourly, check=True) == []
    assert checkpoint(admin, "hourly_stats") == all_events(store)[9].checkpoint


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_interrupted_rebuild_leaves_the_live_tables_as_they_were(
    name: str, db_url: str, pool: ConnectionPool, admin: Admin
) -> None:
    store = PidRecordingStore(pool)
    history(pool, store)
    Runner(db_url, pool).run_once()
    projection = PROJECTIONS[name]
    table, (key,) = next(iter(projection.tables.items()))
    delete = "DELETE FROM {t} WHERE {k} = (SELECT {k} FROM {t} ORDER BY {k} LIMIT 1)"
    admin.execute(sql.SQL(delete).format(t=sql.Identifier(table), k=sql.Identifier(key)))
    tables = [*projection.tables, "projection_checkpoints"]
    before = snapshot(admin, tables)
    calls: list[tuple[int, int]] = []

    def interrupt(done: int, total: int) -> None:
        calls.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rebuild(db_url, store, projection, batch_size=5, progress=interrupt)

    assert calls == [(5, len(positions(admin)))]
    assert snapshot(admin, tables) == before  # the deleted row is still missing
    assert len(store.pids) == 1
    assert_nothing_left_behind(admin, store)
    assert len(rebuild(db_url, store, projection, check=True)) == 1
    assert rebuild(db_url, store, projection) == []
    assert rebuild(db_url, store, projection, check=True) == []


def test_rebuild_reports_progress_up_to_the_total(
    db_url: str, pool: ConnectionPool, admin: Admin
) -> None:
    store = PidRecordingStore(pool)
    history(pool, store)
    total = len(positions(admin))
    calls: list[tuple[int, int]] = []

    rebuild(
        db_url, store, PROJECTIONS["sessions"], batch_size=7, progress=lambda *c: calls.append(c)
    )

    assert [done for done, _ in calls] == [*range(7, total, 7), total]
    assert {t for _, t in calls} == {total}
    assert_nothing_left_behind(admin, store)


def test_rebuild_of_a_catch_up_projection_sets_the_checkpoint_the_runner_continues_from(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    create_counting_table(admin)
    writer = Writer(pool, store, ManualClock(T0))
    write_varied_history(writer)
    counting = counting_projection(tag="runner")
    projections = [counting, *CATCH_UP]
    with psycopg.connect(db_url, autocommit=True) as conn:  # the runner had applied a little
        for projection in projections:
            apply_batch(conn, store, projection, 10)

    for projection in [counting_projection(tag="rebuild"), *CATCH_UP]:
        assert rebuild(db_url, store, projection, batch_size=8) == []
    done = positions(admin)
    assert applied_times(admin) == dict.fromkeys(done, 1)
    for projection in projections:
        assert checkpoint(admin, projection.name) == all_events(store)[-1].checkpoint

    assert Runner(db_url, pool, projections).run_once() == {p.name: 0 for p in projections}
    more = writer.login("zed")
    assert more is not None
    writer.advance(timedelta(minutes=5))
    writer.logout(more)
    assert Runner(db_url, pool, projections).run_once() == {p.name: 2 for p in projections}

    assert applied_times(admin) == dict.fromkeys(positions(admin), 1)
    for projection in CATCH_UP:
        assert rebuild(db_url, store, projection, check=True) == []


def test_inline_rebuild_waits_for_an_open_writer_and_includes_its_events(
    db_url: str, pool: ConnectionPool, store: EventStore, admin: Admin
) -> None:
    recording = PidRecordingStore(pool)
    writer = Writer(pool, store, ManualClock(T0))
    sessions = write_varied_history(writer)
    target = sessions[-1]
    admin.execute("UPDATE sessions SET generation = 42 WHERE session_id = %s", (sessions[0],))
    result: list[list[Drift]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(rebuild(db_url, recording, PROJECTIONS["sessions"], batch_size=5))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    with psycopg.connect(db_url) as open_writer:
        writer.advance(timedelta(minutes=1))
        writer.login("late", conn=open_writer)  # a new session, not committed yet
        writer.expire(sessions[-1], conn=open_writer)  # records the silent idle expiry
        ready = writer.sessions[-1]
        thread.start()
        wait_until(lambda: bool(recording.pids), timeout=10, what="the rebuild to start")
        (pid,) = recording.pids
        wait_until(
            lambda: is_waiting(admin, pid), timeout=10, what="the rebuild to wait for the writer"
        )
        open_writer.commit()
    thread.join(timeout=30)

    assert not errors, errors
    assert result == [[]]
    assert rebuild(db_url, store, PROJECTIONS["sessions"], check=True) == []
    with pool.connection() as conn:
        late = load_session(conn, ready, for_update=False)
        assert late is not None
        assert late.user == "late"
        fixed = load_session(conn, sessions[0], for_update=False)
        assert fixed is not None
        assert fixed.generation != 42
        expired = load_session(conn, target, for_update=False)
        assert expired is not None
        assert expired.end_reason == "idle_timeout"


def is_waiting(admin: Admin, pid: int) -> bool:
    row = admin.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return row is not None and row[0] == "Lock"


def test_a_drift_reads_as_text_not_as_python() -> None:
    at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    changed = Drift(
        "sessions",
        ("s-1",),
        {"generation": 99, "last_activity": at, "scope": ["profile"], "ended_at": None},
        {"generation": 3, "last_activity": at, "scope": ["profile", "email"], "ended_at": at},
    )
    assert str(changed) == (
        "sessions [s-1]: generation: live 99, rebuilt 3; scope: live [profile], rebuilt"
        " [profile, email]; ended_at: live null, rebuilt 2026-03-01T09:00:00.000000Z"
    )
    missing = Drift("alerts", (7,), None, {"kind": "lockout", "details": {"failures": 5}})
    assert str(missing) == (
        'alerts [7]: missing from the live table; rebuilt kind=lockout, details={"failures":5}'
    )
    assert "datetime.datetime" not in str(Drift("t", ("k",), {"at": at}, None))
