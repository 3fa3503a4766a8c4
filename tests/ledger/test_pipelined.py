"""A decision's pipelined transaction on the event loop: its appends and whatever was queued
after them commit together, or nothing does, with the same conflicts as EventStore.append."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from ledger.db import open_async_pool
from ledger.errors import ConcurrencyConflict
from ledger.events import ActivityRecorded
from ledger.store import EventStore, PipelinedTransaction, Stream, pipelined

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
STREAM = Stream("session-1", "session")
PROBE = "INSERT INTO login_throttle (address, tat) VALUES ('probe', now())"
Admin = psycopg.Connection[tuple[object, ...]]


def activity(minutes: int) -> ActivityRecorded:
    return ActivityRecorded(occurred_at=T0 + timedelta(minutes=minutes))


def in_transaction(db_url: str, body: Callable[[PipelinedTransaction], Awaitable[None]]) -> None:
    async def run() -> None:
        pool = await open_async_pool(db_url, max_size=1)
        try:
            async with pipelined(pool) as tx:
                await body(tx)
            async with pool.connection() as conn:  # the connection is clean afterwards
                assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        finally:
            await pool.close()

    asyncio.run(run())


def probes(admin: Admin) -> int:
    row = admin.execute("SELECT count(*) FROM login_throttle WHERE address = 'probe'").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_the_appends_and_what_follows_them_commit_together(
    db_url: str, store: EventStore, admin: Admin
) -> None:
    store.append(STREAM, 0, [activity(0)])

    async def body(tx: PipelinedTransaction) -> None:
        await tx.append(STREAM, 1, [activity(1), activity(2)], {"request_id": "r-1"})
        await tx.conn.execute(PROBE)

    in_transaction(db_url, body)
    events = store.read_stream(STREAM.id)
    assert [e.version for e in events] == [1, 2, 3]
    assert events[2].metadata == {"request_id": "r-1"}
    assert store.verify() == []  # chained exactly as EventStore.append chains
    assert probes(admin) == 1


@pytest.mark.parametrize(("expected", "actual"), [(0, 1), (3, 1)], ids=["behind", "ahead"])
def test_a_stream_at_another_version_commits_nothing_of_the_transaction(
    db_url: str, store: EventStore, admin: Admin, expected: int, actual: int
) -> None:
    store.append(STREAM, 0, [activity(0)])

    async def body(tx: PipelinedTransaction) -> None:
        await tx.append(STREAM, expected, [activity(1)])
        await tx.conn.execute(PROBE)  # queued behind the append, as a projection row is

    with pytest.raises(ConcurrencyConflict) as raised:
        in_transaction(db_url, body)
    assert (raised.value.stream_id, raised.value.expected) == (STREAM.id, expected)
    assert raised.value.actual == actual
    assert [e.version for e in store.read_stream(STREAM.id)] == [1]
    assert probes(admin) == 0


def test_a_failure_in_the_decision_rolls_its_appends_back(
    db_url: str, store: EventStore, admin: Admin
) -> None:
    class Refused(Exception):
        pass

    async def body(tx: PipelinedTransaction) -> None:
        await tx.append(STREAM, 0, [activity(0)])
        await tx.conn.execute(PROBE)
        raise Refused

    with pytest.raises(Refused):
        in_transaction(db_url, body)
    assert store.read_stream(STREAM.id) == []
    assert probes(admin) == 0
