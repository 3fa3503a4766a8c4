"""Connections to PostgreSQL: the pool, the schema, and translation of driver errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ledger.errors import DatabaseUnavailable, LedgerError, StorageError

SCHEMA_VERSION = 1


@contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise driver and pool errors as the ledger's own errors."""
    try:
        yield
    except LedgerError:
        raise
    except (psycopg.OperationalError, PoolTimeout) as e:
        raise DatabaseUnavailable(f"PostgreSQL is unavailable: {_first_line(e)}") from e
    except psycopg.Error as e:
        raise StorageError(f"PostgreSQL refused the statement: {_first_line(e)}") from e


def schema_sql() -> str:
    """The text of schema.sql as installed with the package."""
    return resources.files("ledger").joinpath("schema.sql").read_text(encoding="utf-8")


def apply_schema(url: str) -> None:
    """Create or update every table, index, trigger and grant; safe to run any number of times."""
    with translated_errors(), psycopg.connect(url) as conn:
        conn.execute(schema_sql().encode("utf-8"))
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    if row is None or row[0] != SCHEMA_VERSION:
        found = None if row is None else row[0]
        raise StorageError(f"database schema version is {found}; this code needs {SCHEMA_VERSION}")


def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0
) -> ConnectionPool:
    """Open a connection pool and wait until it holds a working connection."""
    # Autocommit: a single-statement append or read needs no BEGIN/COMMIT round trips; code
    # that needs several statements in one transaction opens one with conn.transaction().
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        name="ledger",
        kwargs={"autocommit": True},
    )
    with translated_errors():
        try:
            pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            pool.close()
            raise
    return pool


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
