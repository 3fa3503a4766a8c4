"""schema.sql against a real PostgreSQL: append-only enforcement, least privilege, idempotence."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import errors as pg_errors

from ledger.db import SCHEMA_VERSION, apply_schema
from ledger.events import SessionEnded
from ledger.store import EventStore, Stream

Admin = psycopg.Connection[tuple[object, ...]]
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def one_event(store: EventStore) -> None:
    store.append(Stream("s-1", "session"), 0, [SessionEnded(occurred_at=T0, reason="logout")])


@pytest.mark.usefixtures("one_event")
@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("UPDATE events SET data = '{}'::jsonb", "UPDATE"),
        ("DELETE FROM events", "DELETE"),
        ("TRUNCATE events", "TRUNCATE"),
    ],
)
def test_events_reject_changes_with_the_triggers_message(
    admin: Admin, statement: str, operation: str
) -> None:
    with pytest.raises(pg_errors.InsufficientPrivilege, match=f"append-only: {operation}"):
        admin.execute(statement)
    assert admin.execute("SELECT count(*) FROM events").fetchone() == (1,)


@pytest.mark.usefixtures("one_event")
@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'x'", "DELETE FROM events"])
def test_runtime_role_cannot_change_rows_even_without_the_trigger(
    admin: Admin, statement: str
) -> None:
    admin.execute("ALTER TABLE events DISABLE TRIGGER USER")
    admin.execute("SET ROLE session_ledger_runtime")
    with pytest.raises(pg_errors.InsufficientPrivilege, match="permission denied"):
        admin.execute(statement)
    admin.execute("RESET ROLE")
    assert admin.execute("SELECT count(*), min(type) FROM events").fetchone() == (1, "SessionEnded")


def test_runtime_role_can_append_and_read(admin: Admin) -> None:
    admin.execute("SET ROLE session_ledger_runtime")
    admin.execute(
        "INSERT INTO events (stream_id, stream_type, version, type, schema_version, data,"
        " occurred_at, prev_hash, hash) VALUES ('s', 'session', 1, 'SessionEnded', 1,"
        " '{}', now(), %s, %s)",
        (bytes(32), bytes(32)),
    )
    assert admin.execute("SELECT count(*) FROM events").fetchone() == (1,)
    with pytest.raises(pg_errors.InsufficientPrivilege):
        admin.execute("TRUNCATE events")


def test_schema_applies_again_without_change(db_url: str, admin: Admin) -> None:
    def shape() -> object:
        return admin.execute(
            "SELECT (SELECT count(*) FROM pg_indexes WHERE tablename = 'events'),"
            " (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass),"
            " (SELECT array_agg(version) FROM schema_version)"
        ).fetchone()

    before = shape()
    apply_schema(db_url)
    apply_schema(db_url)
    assert shape() == before
    assert before == (8, 3, [SCHEMA_VERSION])  # append-only, no truncate, notify


def test_duplicate_stream_version_is_refused_by_the_database(admin: Admin) -> None:
    insert = (
        "INSERT INTO events (stream_id, stream_type, version, type, schema_version, data,"
        " occurred_at, prev_hash, hash) VALUES ('s', 'session', 1, 'X', 1, '{}', now(), %s, %s)"
    )
    admin.execute(insert, (bytes(32), bytes(32)))
    with pytest.raises(pg_errors.UniqueViolation):
        admin.execute(insert, (bytes(32), bytes(32)))


def test_a_database_from_before_version_12_records_the_insert_moment_after_upgrade(
    db_url: str, admin: Admin
) -> None:
    default = (
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a"
        " ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
        " WHERE d.adrelid = 'events'::regclass AND a.attname = 'recorded_at'"
    )
    assert admin.execute(default).fetchone() == ("clock_timestamp()",)
    admin.execute("ALTER TABLE events ALTER COLUMN recorded_at SET DEFAULT now()")
    apply_schema(db_url)
    assert admin.execute(default).fetchone() == ("clock_timestamp()",)
