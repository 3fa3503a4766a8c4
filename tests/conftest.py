"""Test harness: one PostgreSQL server per run, a template database with the schema, a fresh copy
of it for every test, and a clock the tests control.

The server is found in this order: LEDGER_TEST_DATABASE_URL; Docker through testcontainers when a
Docker engine answers; otherwise an embedded PostgreSQL from the pgserver package.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from ledger.clock import ManualClock
from ledger.db import apply_schema, open_pool
from ledger.store import EventStore


def _docker_answers() -> bool:
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    import docker

    try:
        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL of the PostgreSQL server this run uses."""
    url = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if url:
        yield url
    elif _docker_answers():
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before the community split
            from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs, when XDG_RUNTIME_DIR is unset
            from pgserver import get_server

        server = get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
        yield server.get_uri()
        server.cleanup()


def _admin(url: str, statement: sql.Composed) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[str]:
    """The name of a database with schema.sql applied, to copy for each test."""
    name = f"ledger_template_{uuid.uuid4().hex[:12]}"
    _admin(pg_server_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    apply_schema(make_conninfo(pg_server_url, dbname=name))
    yield name
    _admin(
        pg_server_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@pytest.fixture
def db_url(pg_server_url: str, template_db: str) -> Iterator[str]:
    """A superuser URL of a fresh database of this test's own, with the schema in place."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    create = sql.SQL("CREATE DATABASE {} TEMPLATE {}")
    _admin(pg_server_url, create.format(sql.Identifier(name), sql.Identifier(template_db)))
    yield make_conninfo(pg_server_url, dbname=name)
    _admin(
        pg_server_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    with open_pool(db_url, max_size=20) as pool:
        yield pool


@pytest.fixture
def store(pool: ConnectionPool) -> EventStore:
    return EventStore(pool)


@pytest.fixture
def admin(db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A superuser connection to the test's database, in autocommit mode."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
