"""Connections: acting as the runtime role, and a pool that fails fast while the server refuses
connections but not while it is merely busy."""

from __future__ import annotations

import asyncio
import gc
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from ledger.db import (
    FAIL_FAST_SECONDS,
    RUNTIME_ROLE,
    AsyncLedgerPool,
    LedgerPool,
    connect,
    connect_async,
    open_async_pool,
    open_pool,
    translated_errors,
)
from ledger.errors import DatabaseUnavailable
from tests.waiting import wait_until

Admin = psycopg.Connection[tuple[Any, ...]]


def test_connect_acts_as_the_role_it_is_given(db_url: str) -> None:
    with connect(db_url, role=RUNTIME_ROLE) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (RUNTIME_ROLE,)
    with connect(db_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() != (RUNTIME_ROLE,)


def test_an_async_connect_cancelled_midway_leaves_no_connection_open(db_url: str) -> None:
    # A server shutting down cancels the tasks that are connecting; each attempt below is cut at
    # another point (before, during or after the SET ROLE round trip). The pause only spreads
    # the cut over the handshake's real I/O, which turns of the event loop alone do not reach;
    # nothing waits on it.
    async def attempts() -> None:
        for n in range(60):
            task = asyncio.create_task(connect_async(db_url, role=RUNTIME_ROLE))
            await asyncio.sleep(n * 0.0002)
            task.cancel()
            try:
                conn = await task
            except asyncio.CancelledError:
                continue
            await conn.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(attempts())
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def _allow_connections(server_url: str, db_url: str, allowed: bool) -> None:
    """Let the test's database accept connections or not; cut its open ones when not."""
    name = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        statement = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}")
        conn.execute(statement.format(sql.Identifier(str(name)), sql.Literal(allowed)))
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def _select_one(pool: LedgerPool) -> None:
    with translated_errors(), pool.connection() as conn:
        conn.execute("SELECT 1")


async def _select_one_async(pool: AsyncLedgerPool) -> None:
    with translated_errors():
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


def _answers(pool: LedgerPool) -> bool:
    try:
        _select_one(pool)
    except DatabaseUnavailable:
        return False
    return True


def test_once_the_server_is_found_down_callers_fail_fast_until_it_is_back(
    db_url: str, pg_server_url: str
) -> None:
    with (
        open_pool(db_url, min_size=1, max_size=1, timeout=120) as pool,
        ThreadPoolExecutor(max_workers=1) as executor,
    ):
        _select_one(pool)
        _allow_connections(pg_server_url, db_url, False)
        with pytest.raises(DatabaseUnavailable):
            _select_one(pool)  # the pooled connection was cut under it
        # No connection to hand out while new ones are refused: the caller is told after
        # FAIL_FAST_SECONDS, long before its own 120 s timeout (waited on here for 60 s at most).
        caller = executor.submit(_select_one, pool)
        with pytest.raises(DatabaseUnavailable):
            caller.result(timeout=60)

        _allow_connections(pg_server_url, db_url, True)
        # Recovery, with no restart: the pool reconnects on its own.
        wait_until(lambda: _answers(pool), timeout=30, what="the pool to reconnect")


def test_a_caller_fails_fast_when_the_server_goes_down_with_every_connection_in_use(
    db_url: str, pg_server_url: str
) -> None:
    # No connection comes back broken to tell the pool: the one it has stays with its holder.
    with (
        open_pool(db_url, min_size=1, max_size=1, timeout=120) as pool,
        ThreadPoolExecutor(max_workers=1) as executor,
    ):
        held = pool.getconn()
        _allow_connections(pg_server_url, db_url, False)
        caller = executor.submit(_select_one, pool)
        # Answered after FAIL_FAST_SECONDS and one refused connection attempt, not after its
        # own 120 s timeout (waited on here for 60 s at most).
        with pytest.raises(DatabaseUnavailable):
            caller.result(timeout=60)
        _allow_connections(pg_server_url, db_url, True)
        pool.putconn(held)
        wait_until(lambda: _answers(pool), timeout=30, what="the pool to reconnect")


def test_the_async_pool_fails_fast_when_the_server_goes_down_with_every_connection_in_use(
    db_url: str, pg_server_url: str
) -> None:
    async def scenario() -> None:
        pool = await open_async_pool(db_url, min_size=1, max_size=1, timeout=120)
        try:
            held = await pool.getconn()
            _allow_connections(pg_server_url, db_url, False)
            with pytest.raises(DatabaseUnavailable):  # as above: not after its 120 s
                await asyncio.wait_for(_select_one_async(pool), timeout=60)
            _allow_connections(pg_server_url, db_url, True)
            await pool.putconn(held)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_connections_cut_while_idle_are_replaced_before_a_caller_gets_one(
    db_url: str, pg_server_url: str
) -> None:
    with open_pool(db_url, min_size=2, max_size=2, timeout=30) as pool:
        with pool.connection(), pool.connection():
            pass  # both connections open, now idle in the pool
        _cut_idle_connections(pg_server_url, db_url)
        _select_one(pool)  # answered, not failed on a dead connection
        _select_one(pool)


def test_the_async_pool_replaces_connections_cut_while_idle_before_a_caller_gets_one(
    db_url: str, pg_server_url: str
) -> None:
    async def scenario() -> None:
        pool = await open_async_pool(db_url, min_size=2, max_size=2, timeout=30)
        try:
            async with pool.connection(), pool.connection():
                pass  # both connections open, now idle in the pool
            _cut_idle_connections(pg_server_url, db_url)
            await _select_one_async(pool)  # answered, not failed on a dead connection
            await _select_one_async(pool)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_healthy_idle_connection_is_handed_out_without_a_test_query(
    db_url: str, pg_server_url: str
) -> None:
    with (
        open_pool(db_url, min_size=1, max_size=1, timeout=30) as pool,
        psycopg.connect(pg_server_url, autocommit=True) as watcher,
    ):
        with pool.connection() as conn:
            backend = conn.info.backend_pid
            conn.execute("SELECT 'the last statement'")
        with pool.connection() as conn:
            assert conn.info.backend_pid == backend
            # What the server last ran on it: the caller's statement, no test query since.
            row = watcher.execute(
                "SELECT query FROM pg_stat_activity WHERE pid = %s", (backend,)
            ).fetchone()
            assert row == ("SELECT 'the last statement'",)


def _cut_idle_connections(server_url: str, db_url: str) -> None:
    """End every connection to the test's database, as a restart would, and wait till gone."""
    name = str(conninfo_to_dict(db_url)["dbname"])
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        wait_until(lambda: _backends(conn, name) == 0, timeout=30, what="the cut backends to exit")


def _backends(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_busy_pool_times_out_without_taking_the_server_for_down(db_url: str) -> None:
    with (
        open_pool(db_url, min_size=1, max_size=1, timeout=5) as pool,
        ThreadPoolExecutor(max_workers=1) as executor,
    ):
        held = pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        # Taken for down, the pool would fail the next caller after FAIL_FAST_SECONDS; it keeps
        # waiting instead, and gets the connection once it is returned.
        caller = executor.submit(pool.getconn, 60)
        with pytest.raises(FutureTimeout):
            caller.result(timeout=4 * FAIL_FAST_SECONDS)
        pool.putconn(held)
        pool.putconn(caller.result(timeout=30))


def test_the_pool_internals_ledger_pool_uses_are_there(db_url: str) -> None:
    """LedgerPool fails waiting callers through psycopg_pool's private `_lock` and `_waiting`;
    pyproject.toml pins the releases that have them, and this fails when a release drops them."""
    with open_pool(db_url, min_size=1, max_size=1) as pool, pool._lock:
        assert list(pool._waiting) == []


def test_callers_already_waiting_are_answered_when_the_server_is_found_down(
    db_url: str, pg_server_url: str
) -> None:
    with (
        open_pool(db_url, min_size=1, max_size=1, timeout=30) as pool,
        ThreadPoolExecutor(max_workers=1) as executor,
    ):
        held = pool.getconn()
        waiter: Future[None] = executor.submit(_select_one, pool)
        waiting = lambda: pool.get_stats().get("requests_waiting", 0) > 0 or waiter.done()  # noqa: E731
        wait_until(waiting, timeout=30, what="the caller to wait for a connection")
        assert not waiter.done(), waiter.exception()
        _allow_connections(pg_server_url, db_url, False)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")  # cut under the one connection the pool has
        pool.putconn(held)
        # Failed by the broken connection's return, not by its own 30 s timeout running out.
        with pytest.raises(DatabaseUnavailable, match="does not accept connections"):
            waiter.result(timeout=60)
        _allow_connections(pg_server_url, db_url, True)
