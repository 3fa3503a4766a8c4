"""The event store against a real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings

from ledger.chain import Envelope
from ledger.db import open_pool
from ledger.errors import (
    ConcurrencyConflict,
    DatabaseUnavailable,
    InvalidImport,
    SerializationError,
    StorageError,
    UnknownEventType,
)
from ledger.events import ActivityRecorded, Event, SessionEnded, SessionStarted
from ledger.store import (
    START,
    AppendResult,
    Backlog,
    EventStore,
    ImportRecord,
    RecordedEvent,
    Stream,
)
from tests.strategies import any_event, json_objects

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
Admin = psycopg.Connection[tuple[object, ...]]


def session(n: int = 1) -> Stream:
    return Stream(f"session-{n}", "session")


def activity(minutes: int = 0) -> ActivityRecorded:
    return ActivityRecorded(occurred_at=T0 + timedelta(minutes=minutes))


def started() -> SessionStarted:
    return SessionStarted(
        occurred_at=T0,
        user="ada",
        client_id="spa",
        scope=("read", "write"),
        refresh_token_hash="ab" * 32,
        ip="192.0.2.7",
        user_agent="Firefox",
    )


def count_events(admin: Admin) -> int:
    row = admin.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_append_returns_new_version_and_positions(store: EventStore) -> None:
    first = store.append(session(), 0, [started(), activity(1)], {"ip": "192.0.2.7"})
    second = store.append(session(), 2, [activity(2)])
    assert first.version == 2
    assert second.version == 3
    assert len(first.positions) == 2
    assert first.positions[0] < first.positions[1] < second.positions[0]


def test_read_stream_returns_events_with_metadata_in_version_order(store: EventStore) -> None:
    store.append(session(), 0, [started(), activity(1)], {"request_id": "r-1"})
    store.append(session(2), 0, [activity(5)])
    store.append(session(), 2, [activity(2)])
    events = store.read_stream("session-1")
    assert [e.version for e in events] == [1, 2, 3]
    assert [e.event for e in events] == [started(), activity(1), activity(2)]
    assert events[0].metadata == {"request_id": "r-1"}
    assert events[2].metadata == {}
    assert [e.version for e in store.read_stream("session-1", from_version=3)] == [3]


def test_append_rejects_stale_version(store: EventStore, admin: Admin) -> None:
    store.append(session(), 0, [started(), activity(1)])
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append(session(), 1, [activity(2)])
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "session-1",
        1,
        2,
    )
    assert count_events(admin) == 2


def test_append_to_a_new_stream_needs_expected_version_zero(store: EventStore) -> None:
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append(session(), 3, [activity()])
    assert caught.value.actual == 0


@pytest.mark.parametrize("expected", [1, 2, 4])
def test_a_batch_at_a_wrong_version_writes_nothing(
    store: EventStore, admin: Admin, expected: int
) -> None:
    store.append(session(), 0, [started(), activity(1), activity(2)])
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append(session(), expected, [activity(3), activity(4), activity(5)])
    assert (caught.value.expected, caught.value.actual) == (expected, 3)
    assert count_events(admin) == 3
    assert store.append(session(), 3, [activity(3), activity(4)]).version == 5


@pytest.mark.parametrize(("expected", "events"), [(-1, [activity()]), (0, [])])
def test_append_rejects_meaningless_requests(
    store: EventStore, expected: int, events: list[Event]
) -> None:
    with pytest.raises(ValueError, match="expected_version"):
        store.append(session(), expected, events)


def _race(count: int, attempt: Callable[[], object]) -> list[object]:
    """Run `attempt` in `count` threads released at the same moment; collect results or errors."""
    barrier = threading.Barrier(count)
    results: list[object] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            outcome: object = attempt()
        except Exception as e:
            outcome = e
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_one_of_sixteen_concurrent_appenders_wins(store: EventStore, batch: int) -> None:
    store.append(session(), 0, [started()])
    events = [activity(n) for n in range(batch)]
    results = _race(16, lambda: store.append(session(), 1, events))
    wins = [r for r in results if isinstance(r, AppendResult)]
    conflicts = [r for r in results if isinstance(r, ConcurrencyConflict)]
    assert len(wins) == 1
    assert len(conflicts) == 15
    assert all((c.expected, c.actual) == (1, 1 + batch) for c in conflicts)
    assert [e.version for e in store.read_stream("session-1")] == list(range(1, batch + 2))
    assert store.verify() == []


@pytest.mark.slow
def test_retrying_appenders_keep_versions_contiguous(store: EventStore) -> None:
    def append_five() -> int:
        done = 0
        while done < 5:
            try:
                store.append(session(), store.version("session-1"), [activity(done)])
                done += 1
            except ConcurrencyConflict:
                continue
        return done

    assert _race(16, append_five) == [5] * 16
    versions = [e.version for e in store.read_stream("session-1")]
    assert versions == list(range(1, 81))
    assert store.verify() == []


def test_append_joins_the_callers_transaction(store: EventStore, db_url: str, admin: Admin) -> None:
    with psycopg.connect(db_url) as conn:
        store.append(session(), 0, [started(), activity(1)], conn=conn)
        conn.rollback()
    assert count_events(admin) == 0
    with psycopg.connect(db_url) as conn:
        store.append(session(), 0, [started()], conn=conn)
        conn.commit()
    assert count_events(admin) == 1


def test_append_joins_a_transaction_block_on_an_autocommit_connection(
    store: EventStore, db_url: str, admin: Admin
) -> None:
    def append_then_fail(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        with conn.transaction():
            store.append(session(), 0, [started(), activity(1)], conn=conn)
            raise RuntimeError("the caller's work failed")

    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(RuntimeError):
            append_then_fail(conn)
        assert count_events(admin) == 0
        with pytest.raises(ValueError, match="in a transaction"):
            store.append(session(), 0, [started()], conn=conn)
        with conn.transaction():
            store.append(session(), 0, [started()], conn=conn)
    assert count_events(admin) == 1


def test_unserializable_event_writes_nothing(store: EventStore, admin: Admin) -> None:
    bad = SessionEnded(occurred_at=T0, reason="log\x00out")
    with pytest.raises(SerializationError, match="NUL"):
        store.append(session(), 0, [started(), bad])
    with pytest.raises(SerializationError, match="float"):
        store.append(session(), 0, [started()], {"latency": 1.5})
    assert count_events(admin) == 0


def test_unregistered_event_type_writes_nothing(store: EventStore, admin: Admin) -> None:
    with pytest.raises(UnknownEventType):
        store.append(session(), 0, [started(), Event(occurred_at=T0)])
    assert count_events(admin) == 0


def test_reading_an_unknown_stored_type_raises_typed_error(store: EventStore, admin: Admin) -> None:
    admin.execute(
        "INSERT INTO events (stream_id, stream_type, version, type, schema_version, data,"
        " occurred_at, prev_hash, hash) VALUES ('x', 'session', 1, 'Vanished', 1, '{}', now(),"
        " %s, %s)",
        (bytes(32), bytes(32)),
    )
    with pytest.raises(UnknownEventType, match="Vanished"):
        store.read_stream("x")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=any_event(), metadata=json_objects)
def test_every_event_type_round_trips_through_postgres(
    store: EventStore, event: Event, metadata: dict[str, object]
) -> None:
    stream = Stream(f"rt-{id(event)}-{event.occurred_at.timestamp()}", "test")
    version = store.version(stream.id)
    store.append(stream, version, [event], metadata)
    stored = store.read_stream(stream.id, from_version=version + 1)[0]
    assert stored.event == event
    assert stored.metadata == metadata


def _checkpoints(events: list[RecordedEvent]) -> list[tuple[str, int]]:
    return [(e.stream_id, e.version) for e in events]


def test_read_all_pages_through_everything_once(store: EventStore) -> None:
    for n in range(1, 8):
        store.append(session(n), 0, [started(), activity(n), activity(n + 1)])
    seen: list[RecordedEvent] = []
    checkpoint = START
    while page := store.read_all(after=checkpoint, limit=4):
        seen.extend(page)
        checkpoint = page[-1].checkpoint
    assert len(seen) == 21
    assert len(set(_checkpoints(seen))) == 21
    assert [e.position for e in seen] == sorted(e.position for e in seen)


@pytest.mark.parametrize("b_first_xid", [False, True], ids=["a-older-xid", "b-older-xid"])
def test_reader_never_skips_a_late_commit(
    store: EventStore, db_url: str, b_first_xid: bool
) -> None:
    """A takes a lower position than B but commits after B; the reader polls in between."""
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b:
        if b_first_xid:
            b.execute("SELECT pg_current_xact_id()")  # B's transaction id is the older one
        store.append(session(1), 0, [activity(1)], conn=a)
        store.append(session(2), 0, [activity(2)], conn=b)
        b.commit()
        first_poll = store.read_all(after=START)
        checkpoint = first_poll[-1].checkpoint if first_poll else START
        a.commit()
        second_poll = store.read_all(after=checkpoint)
        third_poll = store.read_all(after=second_poll[-1].checkpoint)

    received = _checkpoints(first_poll + second_poll)
    assert sorted(received) == [("session-1", 1), ("session-2", 1)]
    assert len(set(received)) == len(received) == 2
    assert third_poll == []
    a_position = next(e.position for e in first_poll + second_poll if e.stream_id == "session-1")
    b_position = next(e.position for e in first_poll + second_poll if e.stream_id == "session-2")
    assert a_position < b_position


def test_verify_passes_on_an_untouched_ledger(store: EventStore) -> None:
    store.append(session(), 0, [started(), activity(1)])
    store.append(session(2), 0, [started()])
    assert store.verify() == []


def stored_link(admin: Admin, stream_id: str, version: int) -> tuple[bytes, bytes, Envelope]:
    """An event's stored prev_hash and hash, and the envelope of what is stored now."""
    row = admin.execute(
        "SELECT prev_hash, hash, stream_id, stream_type, version, type, schema_version,"
        " occurred_at, data, metadata FROM events WHERE stream_id = %s AND version = %s",
        (stream_id, version),
    ).fetchone()
    assert row is not None
    prev_hash, stored_hash, *fields = row
    assert isinstance(prev_hash, bytes)
    assert isinstance(stored_hash, bytes)
    return prev_hash, stored_hash, Envelope.of(*fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tamper", "version", "reason"),
    [
        ('UPDATE events SET data = \'{"reason": "expired"}\' WHERE version = 2', 2, "content"),
        ('UPDATE events SET metadata = \'{"ip": "203.0.113.9"}\' WHERE version = 2', 2, "content"),
        (
            "UPDATE events SET occurred_at = occurred_at + interval '1s' WHERE version = 2",
            2,
            "content",
        ),
        ("UPDATE events SET type = 'SessionStarted' WHERE version = 2", 2, "content"),
        ("UPDATE events SET prev_hash = hash WHERE version = 2", 2, "prev_hash does not match"),
        ("DELETE FROM events WHERE version = 2", 3, "version out of sequence"),
    ],
)
def test_verify_names_the_first_broken_link(
    store: EventStore, admin: Admin, tamper: str, version: int, reason: str
) -> None:
    store.append(session(), 0, [started(), SessionEnded(occurred_at=T0, reason="logout")])
    store.append(session(), 2, [activity(3)])
    store.append(session(2), 0, [started(), activity(1)])
    _, first_hash, _ = stored_link(admin, "session-1", 1)
    _, second_hash, _ = stored_link(admin, "session-1", 2)
    admin.execute("ALTER TABLE events DISABLE TRIGGER USER")
    admin.execute(tamper.replace("WHERE", "WHERE stream_id = 'session-1' AND"))
    broken = store.verify()
    assert [(b.stream_id, b.version) for b in broken] == [("session-1", version)]
    assert reason in broken[0].reason
    if reason == "content":  # the hash of what is stored now, against the hash written then
        prev_hash, stored_hash, tampered = stored_link(admin, "session-1", 2)
        assert (prev_hash, stored_hash) == (first_hash, second_hash)
        recomputed = hashlib.sha256(prev_hash + tampered.body()).digest()
        assert recomputed == tampered.link_hash(prev_hash)
        expected, found = recomputed.hex(), second_hash.hex()
    elif reason == "prev_hash does not match":  # version 1's hash, against the one put in its place
        expected, found = first_hash.hex(), second_hash.hex()
    else:  # the version that should follow 1, against the one that does
        expected, found = "2", "3"
    assert (broken[0].expected, broken[0].found) == (expected, found)
    assert expected != found


def _records(stream_id: str, versions: range) -> list[ImportRecord]:
    return [
        ImportRecord(stream_id, "session", v, "ActivityRecorded", 1, T0, {}, {"n": v})
        for v in versions
    ]


def test_import_continues_versions_and_chains(store: EventStore) -> None:
    store.append(session(), 0, [started()])
    records = _records("session-1", range(2, 6)) + _records("session-9", range(1, 12_001))
    assert store.import_events(records) == 12_004
    assert [e.version for e in store.read_stream("session-1")] == [1, 2, 3, 4, 5]
    assert store.version("session-9") == 12_000
    assert store.verify() == []
    store.append(session(), 5, [activity(9)])
    assert store.verify() == []


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (_records("session-1", range(3, 5)), "version 3 cannot follow version 1"),
        (_records("fresh", range(1, 3)) + _records("fresh", range(1, 2)), "cannot follow"),
        ([ImportRecord("fresh", "session", 1, "Nope", 1, T0, {}, {})], "unknown event type"),
    ],
)
def test_bad_import_writes_nothing(
    store: EventStore, admin: Admin, records: list[ImportRecord], message: str
) -> None:
    store.append(session(), 0, [started()])
    with pytest.raises((InvalidImport, UnknownEventType), match=message):
        store.import_events(_records("other", range(1, 6_000)) + records)
    assert count_events(admin) == 1


def test_unreachable_database_raises_database_unavailable() -> None:
    with pytest.raises(DatabaseUnavailable, match="unavailable"):
        open_pool("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", timeout=1.0)


def test_missing_schema_raises_storage_error(pg_server_url: str) -> None:
    with open_pool(pg_server_url, max_size=1) as pool:
        missing = EventStore(pool)
        # The server's maintenance database has no ledger schema; the driver error is translated.
        with pytest.raises(StorageError, match="events"):
            missing.read_stream("x")


def test_an_append_from_a_transaction_older_than_the_streams_head_is_refused(
    store: EventStore, db_url: str, admin: Admin
) -> None:
    # Catch-up readers go in transaction order, so version 2 must not come from a transaction
    # that began (took its id) before the one that wrote version 1.
    with psycopg.connect(db_url) as older:
        older.execute("SELECT pg_current_xact_id()")  # takes its transaction id now
        store.append(session(), 0, [started()])  # a newer transaction writes version 1
        with pytest.raises(ConcurrencyConflict, match="began after this one") as caught:
            store.append(session(), 1, [activity(1)], conn=older)
        older.rollback()
    assert (caught.value.expected, caught.value.actual) == (1, 1)
    assert store.append(session(), 1, [activity(1)]).version == 2  # a new transaction may
    assert [e.version for e in store.read_all()] == [1, 2]


def test_read_first_returns_each_streams_first_event_decoded(store: EventStore) -> None:
    store.append(session(1), 0, [started(), activity(1)])
    store.append(session(2), 0, [activity(2), activity(3)])

    first = {e.stream_id: e for e in store.read_first(["session-1", "session-2", "none"])}

    assert sorted(first) == ["session-1", "session-2"]
    assert first["session-1"].event == started()
    assert first["session-2"].version == 1


def test_read_first_joins_the_callers_transaction(store: EventStore, db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        store.append(session(), 0, [started()], conn=conn)
        assert [e.stream_id for e in store.read_first(["session-1"], conn=conn)] == ["session-1"]
        conn.rollback()
    assert store.read_first(["session-1"]) == []


def test_backlog_counts_events_after_a_checkpoint_and_dates_the_oldest(
    store: EventStore, admin: Admin
) -> None:
    assert store.backlog(START) == Backlog(0, None)
    store.append(session(1), 0, [started(), activity(1)])
    store.append(session(2), 0, [activity(2)])
    events = store.read_all()

    behind = store.backlog(events[0].checkpoint, conn=admin)

    assert behind == Backlog(2, min(e.recorded_at for e in events[1:]))
    assert store.backlog(events[-1].checkpoint) == Backlog(0, None)


def test_count_counts_events_up_to_a_checkpoint_or_all(store: EventStore) -> None:
    assert store.count() == 0
    store.append(session(1), 0, [started(), activity(1), activity(2)])
    events = store.read_all()

    assert store.count() == 3
    assert store.count(events[1].checkpoint) == 2
    assert store.count(START) == 0


def test_an_event_is_never_recorded_before_it_occurred(store: EventStore, db_url: str) -> None:
    """recorded_at is the insert's moment: an event whose time was read inside its transaction
    (as a decision's is, under its row lock) is not recorded at the transaction's start."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        conn.execute("SELECT 1")  # the transaction, and now(), have begun
        events = [SessionEnded(occurred_at=datetime.now(UTC), reason="logout") for _ in range(3)]
        for n, event in enumerate(events):
            store.append(session(7), n, [event], conn=conn)
    for recorded in store.read_stream(session(7).id):
        assert recorded.recorded_at >= recorded.occurred_at
