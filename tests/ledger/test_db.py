"""Connections: acting as the runtime role, and a pool that fails fast while the server refuses
connections but not while it is merely busy."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from ledger.db import RUNTIME_ROLE, LedgerPool, connect, open_pool, translated_errors
from ledger.errors import DatabaseUnavailable
from tests.waiting import wait_until

Admin = psycopg.Connection[tuple[Any, ...]]


def test_connect_acts_as_the_role_it_is_given(db_url: str) -> None:
    with connect(db_url, role=RUNTIME_ROLE) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (RUNTIME_ROLE,)
    with connect(db_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() != (RUNTIME_ROLE,)


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


def test_a_cut_connection_to_a_refusing_server_marks_it_unreachable_until_one_works(
    db_url: str, pg_server_url: str
) -> None:
    with open_pool(db_url, min_size=1, max_size=1, timeout=5) as pool:
        _select_one(pool)
        assert not pool.is_unreachable
        _allow_connections(pg_server_url, db_url, False)
        with pytest.raises(DatabaseUnavailable):
            _select_one(pool)  # the pooled connection was cut under it
        assert pool.is_unreachable
        with pytest.raises(DatabaseUnavailable):
            _select_one(pool)  # no connection to hand out while new ones are refused
        assert pool.is_unreachable

        _allow_connections(pg_server_url, db_url, True)
        deadline = time.monotonic() + 30
        while pool.is_unreachable:  # recovery, polled with a bound: no restart, no sleep needed
            with suppress(DatabaseUnavailable):
                _select_one(pool)
            assert time.monotonic() < deadline, "the pool did not reconnect within 30 s"
        _select_one(pool)


def test_a_busy_pool_times_out_without_taking_the_server_for_down(db_url: str) -> None:
    with open_pool(db_url, min_size=1, max_size=1, timeout=5) as pool, pool.connection():
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        assert not pool.is_unreachable


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
