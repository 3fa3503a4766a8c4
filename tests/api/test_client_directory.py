"""Clients on the request path come from memory only while a ChangeFollower listens for changes:
a changed or removed client takes effect at once, and a cut listener means no caching at all."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import pytest
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from api.accounts import Accounts, ClientDirectory
from api.changes import ChangeFollower
from ledger.db import AsyncLedgerPool, open_async_pool
from ledger.errors import LedgerError

Connection = psycopg.Connection[TupleRow]
BOUND = 10.0
"""Seconds any wait in these tests may take before it fails."""


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    async def poll() -> None:
        while not await condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), BOUND)
    except TimeoutError:
        raise AssertionError(f"not within {BOUND} s: {what}") from None


class Followed:
    """A directory wired to a follower, as the app wires them, with the changes it was told."""

    def __init__(self, db_url: str, apool: AsyncLedgerPool) -> None:
        self.changes: list[str | None] = []
        self.follower = ChangeFollower(db_url, self._changed, retry_seconds=0.05)
        self.directory = ClientDirectory(apool, live=lambda: self.follower.listening)

    async def _changed(self, table: str | None) -> None:
        self.changes.append(table)
        if table in (None, "clients"):
            self.directory.forget()


Scenario = Callable[[Followed, AsyncLedgerPool], Awaitable[None]]


def run_followed(db_url: str, scenario: Scenario) -> None:
    async def main() -> None:
        apool = await open_async_pool(db_url, max_size=1, timeout=0.5)
        followed = Followed(db_url, apool)
        task = asyncio.create_task(followed.follower.run())
        try:
            await until(lambda: asyncio.sleep(0, followed.follower.listening), "listening")
            await scenario(followed, apool)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await apool.close()

    asyncio.run(main())


@pytest.fixture
def spa(pool: ConnectionPool) -> None:
    Accounts(pool).add_client("spa", None, ("password", "refresh_token"))


@pytest.mark.usefixtures("spa")
def test_a_listed_client_is_served_from_memory_while_changes_are_followed(db_url: str) -> None:
    async def scenario(followed: Followed, apool: AsyncLedgerPool) -> None:
        first = await followed.directory.client("spa")
        assert first is not None
        async with apool.connection():  # the pool's only connection: no lookup can read
            assert await followed.directory.client("spa") == first
            with pytest.raises(LedgerError):
                await followed.directory.client("unknown")  # never cached: it must read
        assert await followed.directory.client("unknown") is None
        async with apool.connection():
            with pytest.raises(LedgerError):
                await followed.directory.client("unknown")  # not remembered as unknown either

    run_followed(db_url, scenario)


@pytest.mark.usefixtures("spa")
def test_a_removed_or_changed_client_takes_effect_when_the_change_is_announced(
    db_url: str, admin: Connection
) -> None:
    async def scenario(followed: Followed, apool: AsyncLedgerPool) -> None:
        assert (await followed.directory.client("spa")) is not None
        admin.execute("UPDATE clients SET grants = '{refresh_token}' WHERE client_id = 'spa'")

        async def narrowed() -> bool:
            client = await followed.directory.client("spa")
            return client is not None and client.grants == ("refresh_token",)

        await until(narrowed, "the changed grants to be served")
        admin.execute("DELETE FROM clients WHERE client_id = 'spa'")

        async def removed() -> bool:
            return await followed.directory.client("spa") is None

        await until(removed, "the removed client to be refused")
        assert followed.changes[0] is None  # what changed before it listened is re-read
        assert followed.changes[1:] == ["clients", "clients"]

    run_followed(db_url, scenario)


@pytest.mark.usefixtures("spa")
def test_a_cut_listener_stops_the_caching_and_listens_again(db_url: str, admin: Connection) -> None:
    async def scenario(followed: Followed, apool: AsyncLedgerPool) -> None:
        assert (await followed.directory.client("spa")) is not None
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%ledger_changes%'",
        )

        async def relistened() -> bool:
            return followed.changes.count(None) == 2

        await until(relistened, "the follower to listen again and report a gap")
        assert followed.follower.listening

    run_followed(db_url, scenario)


@pytest.mark.usefixtures("spa")
def test_a_lookup_in_flight_when_a_change_is_announced_is_not_kept(db_url: str) -> None:
    async def scenario(followed: Followed, apool: AsyncLedgerPool) -> None:
        with psycopg.connect(db_url) as blocker:
            blocker.execute("LOCK TABLE clients IN ACCESS EXCLUSIVE MODE")
            lookup = asyncio.create_task(followed.directory.client("spa"))

            async def waiting() -> bool:
                return apool.get_stats().get("pool_available", 0) == 0

            await until(waiting, "the lookup to wait on the locked table")
            followed.directory.forget()  # as an announced change does
            blocker.rollback()
        assert await lookup is not None
        async with apool.connection():
            with pytest.raises(LedgerError):
                await followed.directory.client("spa")  # not cached: it must read again

    run_followed(db_url, scenario)


def test_a_failing_handler_makes_the_follower_start_over(db_url: str) -> None:
    told: list[str | None] = []

    async def changed(table: str | None) -> None:
        told.append(table)
        if len(told) == 1:
            raise RuntimeError("could not read the keys")

    async def main() -> None:
        follower = ChangeFollower(db_url, changed, retry_seconds=0.01)
        task = asyncio.create_task(follower.run())
        try:
            await until(lambda: asyncio.sleep(0, len(told) == 2), "a second start")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert told == [None, None]  # the failed change was not skipped: all was re-read

    asyncio.run(main())
