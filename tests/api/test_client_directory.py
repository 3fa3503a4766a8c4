"""Clients on the request path come from memory for up to CLIENT_CACHE_SECONDS, so a changed or
removed client takes effect within that time; an unknown id is looked up every time."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg_pool import ConnectionPool

from api.accounts import CLIENT_CACHE_SECONDS, Accounts, Client, ClientDirectory
from ledger.db import open_async_pool


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lookups(
    db_url: str, steps: list[tuple[str, float]], admin_sql: dict[int, str]
) -> list[Client | None]:
    """Look up each (client id, seconds to move the clock first); run admin_sql[i] before step i."""

    async def run() -> list[Client | None]:
        pool = await open_async_pool(db_url, max_size=1)
        ticks = Ticks()
        directory = ClientDirectory(pool, monotonic=ticks)
        found: list[Client | None] = []
        try:
            for i, (client_id, elapsed) in enumerate(steps):
                if i in admin_sql:
                    with psycopg.connect(db_url, autocommit=True) as conn:
                        conn.execute(admin_sql[i])
                ticks.now += elapsed
                found.append(await directory.client(client_id))
        finally:
            await pool.close()
        return found

    return asyncio.run(run())


def test_a_removed_client_is_served_from_memory_only_until_the_cache_time_passes(
    db_url: str, pool: ConnectionPool
) -> None:
    Accounts(pool).add_client("spa", None, ("password", "refresh_token"))
    remove = "DELETE FROM clients WHERE client_id = 'spa'"
    almost, past = CLIENT_CACHE_SECONDS * 0.9, CLIENT_CACHE_SECONDS * 0.2
    first, cached, gone = lookups(db_url, [("spa", 0), ("spa", almost), ("spa", past)], {1: remove})
    assert first is not None
    assert first.client_id == "spa"
    assert cached == first  # removed in the database, still in memory within the cache time
    assert gone is None


def test_an_unknown_client_is_not_remembered(db_url: str, pool: ConnectionPool) -> None:
    add = (
        "INSERT INTO clients (client_id, secret_hash, grants)"
        " VALUES ('late', NULL, '{password,refresh_token}')"
    )
    before, after = lookups(db_url, [("late", 0), ("late", 0)], {1: add})
    assert before is None
    assert after is not None
    assert after.grants == ("password", "refresh_token")
