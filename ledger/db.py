"""Connections to PostgreSQL: the pool, the schema, and translation of driver errors."""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from time import monotonic
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from ledger.errors import DatabaseUnavailable, LedgerError, StorageError

SCHEMA_VERSION = 12
RUNTIME_ROLE = "session_ledger_runtime"
"""The least-privilege role schema.sql creates; the server acts as it (SET ROLE) at run time."""
LOGIN_ROLE = "session_ledger_app"
"""The login `serve` uses on the embedded server: no attributes, a member of RUNTIME_ROLE only."""
RECONNECT_SECONDS = 5.0
"""How long the pool retries one failed reconnection before giving it up to the next request."""
FAIL_FAST_SECONDS = 0.5
"""How long a request waits for a connection while the server is known to be unreachable."""


@contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise driver and pool errors as the ledger's own errors."""
    try:
        yield
    except LedgerError:
        raise
    except (psycopg.OperationalError, PoolTimeout) as e:
        raise DatabaseUnavailable(f"PostgreSQL is unavailable: {first_line(e)}") from e
    except psycopg.Error as e:
        raise StorageError(f"PostgreSQL refused the statement: {first_line(e)}") from e


def schema_sql() -> str:
    """The text of schema.sql as installed with the package."""
    return resources.files("ledger").joinpath("schema.sql").read_text(encoding="utf-8")


def schema_exists(url: str) -> bool:
    """Whether the database at `url` holds this project's schema, of any version."""
    with translated_errors(), psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    return row == (True,)


def apply_schema(url: str) -> None:
    """Create or update every table, index, trigger and grant; safe to run any number of times.

    A login that may not change the schema (one holding only the runtime role) goes on when the
    schema is already current, and is told to apply it with the owner's URL when it is not.
    """
    denied = None
    with translated_errors(), psycopg.connect(url) as conn:
        try:
            conn.execute(schema_sql().encode("utf-8"))
        except psycopg.errors.InsufficientPrivilege as e:
            conn.rollback()
            denied = first_line(e)
        try:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
    if row is None or row[0] != SCHEMA_VERSION:
        found = None if row is None else row[0]
        message = f"database schema version is {found}; this code needs {SCHEMA_VERSION}"
        if denied is not None:
            message += f" and this user may not apply it ({denied}): run `session-ledger db init`"
            message += " with LEDGER_DATABASE_URL set to the owner's URL"
        raise StorageError(message)


def create_login_role(url: str) -> str:
    """Create (or reset) LOGIN_ROLE holding RUNTIME_ROLE and nothing else; return its URL.

    `url` is a superuser's. The new login has no password: use it only where the server trusts
    local logins over a socket no one else can reach, as the embedded server's is.
    """
    login, runtime = sql.Identifier(LOGIN_ROLE), sql.Identifier(RUNTIME_ROLE)
    with translated_errors(), psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (LOGIN_ROLE,))
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(login))
        # Whatever was granted to it by hand since, it leaves with one membership and no powers.
        attributes = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS LOGIN"
        conn.execute(sql.SQL("ALTER ROLE {} " + attributes).format(login))
        granted = conn.execute(
            "SELECT g.rolname FROM pg_auth_members m"
            " JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member"
            " WHERE r.rolname = %s AND g.rolname <> %s",
            (LOGIN_ROLE, RUNTIME_ROLE),
        ).fetchall()
        for (other,) in granted:
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(other), login))
        conn.execute(sql.SQL("GRANT {} TO {}").format(runtime, login))
    return make_conninfo(url, user=LOGIN_ROLE, password=None)


def connect(url: str, *, role: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection that acts as `role` (SET ROLE) when one is given."""
    conn = psycopg.connect(url, autocommit=True)
    if role is not None:
        try:
            _set_role(conn, role)
        except psycopg.Error:
            conn.close()
            raise
    return conn


async def connect_async(url: str, *, role: str | None = None) -> psycopg.AsyncConnection[TupleRow]:
    """connect() for the event loop."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    if role is not None:
        try:
            await conn.execute(_set_role_statement(role))
        except BaseException:  # a failure, or a cancelled task (a server shutting down)
            await conn.close()
            raise
    return conn


def check_role(url: str, role: str) -> None:
    """Raise StorageError, saying what to do, unless the URL's user may act as `role`."""
    with translated_errors():
        try:
            connect(url, role=role).close()
        except psycopg.errors.InsufficientPrivilege as e:
            raise StorageError(
                f"the database user may not act as {role} ({first_line(e)}); "
                f"as a superuser run: GRANT {role} TO <the service's login role>"
            ) from None
        except psycopg.errors.InvalidParameterValue:
            raise StorageError(
                f"role {role} does not exist; as a superuser run: CREATE ROLE {role} NOLOGIN, "
                "then start the service again so the schema grants it its privileges"
            ) from None


def open_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 10.0,
    role: str | None = None,
) -> LedgerPool:
    """Open a connection pool and wait until it holds a working connection; with `role`, every
    connection acts as that role (SET ROLE)."""
    pool = LedgerPool(
        url,
        **_pool_options(min_size, max_size, timeout, "ledger"),
        configure=None if role is None else lambda conn: _set_role(conn, role),
    )
    with translated_errors():
        try:
            pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            pool.close()
            raise
    return pool


def _pool_options(min_size: int, max_size: int, timeout: float, name: str) -> dict[str, Any]:
    """What open_pool and open_async_pool share."""
    return {
        "min_size": min_size,
        "max_size": max_size,
        "timeout": timeout,
        "open": False,
        "name": name,
        # Autocommit: a single-statement append or read needs no BEGIN/COMMIT round trips; code
        # that needs several statements in one transaction opens one.
        "kwargs": {"autocommit": True},
        # A failing reconnection backs off (1 s, 2 s, 4 s, ...); giving it up after a few
        # seconds lets the next waiting request start afresh, so recovery after an outage takes
        # seconds however long the outage was.
        "reconnect_timeout": RECONNECT_SECONDS,
    }


class _Wait:
    """One caller's wait for a connection, in the fail-fast rule LedgerPool describes."""

    def __init__(self, timeout: float) -> None:
        self.deadline = monotonic() + timeout
        self.probed = False

    def seconds(self) -> float:
        """How long to wait now: FAIL_FAST_SECONDS at first, then whatever is left."""
        left = max(self.deadline - monotonic(), 0.0)
        return left if self.probed else min(left, FAIL_FAST_SECONDS)

    def may_go_on(self) -> bool:
        """After a wait ran out on a server that answers: whether to wait once more."""
        if self.probed or monotonic() >= self.deadline:
            return False
        self.probed = True
        return True


class LedgerPool(ConnectionPool):
    """A pool that stops making callers wait out the whole timeout while PostgreSQL is down.

    When a connection comes back broken, or a caller has waited FAIL_FAST_SECONDS for one, and
    a fresh connection attempt fails too, the server is taken as unreachable: every caller
    already waiting is answered at once, and until a connection is handed out again new callers
    wait at most FAIL_FAST_SECONDS (the pool keeps reconnecting in the background meanwhile).
    The check after a caller's first FAIL_FAST_SECONDS matters when every connection was lost
    where no broken return could tell (in use elsewhere, or closed by a failed reset); it is
    made at most once per FAIL_FAST_SECONDS, so a merely busy server is not sent a connection
    attempt per waiting caller. A server that answers is plain saturation: the caller waits out
    the rest of its timeout.

    A connection with input waiting while idle is tested (an empty query) before it is handed
    out: a server that ends a connection (a restart, pg_terminate_backend) sends its reason and
    closes the socket, so a worker whose idle connections a restart cut answers its next request
    instead of failing it, and a healthy connection costs no round trip. A connection found cut
    is returned as broken (see putconn), and another one taken.
    """

    _unreachable = False

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[tuple[object, ...]]:
        conn = self._getconn_fast(timeout)
        if not _input_waiting(conn):
            return conn
        try:
            self.check_connection(conn)
        except psycopg.Error:
            self.putconn(conn)
            conn = self._getconn_fast(timeout)
        return conn

    def _getconn_fast(self, timeout: float | None) -> psycopg.Connection[tuple[object, ...]]:
        wait = _Wait(self.timeout if timeout is None else timeout)
        while True:
            try:
                conn = super().getconn(wait.seconds())
            except PoolTimeout:
                if self._unreachable:
                    raise
                if not self._server_answered_lately():
                    self._mark_unreachable()
                    raise
                if not wait.may_go_on():
                    raise
                continue
            self._unreachable = False
            return conn

    def putconn(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        broken = conn.broken
        if broken and not self._unreachable and not self._server_answers():
            self._mark_unreachable()
        super().putconn(conn)
        if broken:
            # What cut this connection (a restart, say) most likely cut the idle ones too: test
            # them now rather than fail one request for each.
            self.check()

    def _mark_unreachable(self) -> None:
        self._unreachable = True
        # Callers that began waiting before this was known would wait out the full timeout.
        # `_lock` and `_waiting` are psycopg_pool's own: pyproject.toml pins the releases that
        # have them, and tests/ledger/test_db.py fails when they change.
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for client in waiting:
            client.fail(psycopg.OperationalError("PostgreSQL does not accept connections"))

    _answered_at = float("-inf")

    def _server_answered_lately(self) -> bool:
        """_server_answers, asked at most once per FAIL_FAST_SECONDS while it answers."""
        if monotonic() - self._answered_at < FAIL_FAST_SECONDS:
            return True
        answers = self._server_answers()
        if answers:
            self._answered_at = monotonic()
        return answers

    def _server_answers(self) -> bool:
        url = self.conninfo() if callable(self.conninfo) else self.conninfo
        with suppress(psycopg.Error):
            psycopg.connect(url, connect_timeout=2).close()
            return True
        return False


def _input_waiting(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection has something to read: the server's goodbye, an end of file,
    or a notification; a healthy idle connection has nothing."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


async def open_async_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 10.0,
    role: str | None = None,
) -> AsyncLedgerPool:
    """open_pool for the event loop: the same options and the same fail-fast behaviour."""

    async def act_as_role(conn: psycopg.AsyncConnection[TupleRow]) -> None:
        if role is not None:
            await conn.execute(_set_role_statement(role))

    pool = AsyncLedgerPool(
        url,
        **_pool_options(min_size, max_size, timeout, "ledger-async"),
        configure=act_as_role,
    )
    with translated_errors():
        try:
            await pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            await pool.close()
            raise
    return pool


class AsyncLedgerPool(AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]):
    """LedgerPool's fail-fast rule and its test of idle connections with input waiting, for the
    event loop's pool (see LedgerPool)."""

    _unreachable = False

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[TupleRow]:
        conn = await self._getconn_fast(timeout)
        if not _input_waiting(conn):
            return conn
        try:
            await self.check_connection(conn)
        except psycopg.Error:
            await self.putconn(conn)
            conn = await self._getconn_fast(timeout)
        return conn

    async def _getconn_fast(self, timeout: float | None) -> psycopg.AsyncConnection[TupleRow]:
        wait = _Wait(self.timeout if timeout is None else timeout)
        while True:
            try:
                conn = await super().getconn(wait.seconds())
            except PoolTimeout:
                if self._unreachable:
                    raise
                if not await self._server_answered_lately():
                    await self._mark_unreachable()
                    raise
                if not wait.may_go_on():
                    raise
                continue
            self._unreachable = False
            return conn

    async def putconn(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        broken = conn.broken
        if broken and not self._unreachable and not await self._server_answers():
            await self._mark_unreachable()
        await super().putconn(conn)
        if broken:
            await self.check()  # as LedgerPool.putconn

    async def _mark_unreachable(self) -> None:
        self._unreachable = True
        async with self._lock:  # psycopg_pool's own, as in LedgerPool
            waiting = list(self._waiting)
            self._waiting.clear()
        for client in waiting:
            await client.fail(psycopg.OperationalError("PostgreSQL does not accept connections"))

    _answered_at = float("-inf")

    async def _server_answered_lately(self) -> bool:
        """As LedgerPool._server_answered_lately."""
        if monotonic() - self._answered_at < FAIL_FAST_SECONDS:
            return True
        answers = await self._server_answers()
        if answers:
            self._answered_at = monotonic()
        return answers

    async def _server_answers(self) -> bool:
        url = self.conninfo() if callable(self.conninfo) else self.conninfo
        with suppress(psycopg.Error):
            await (await psycopg.AsyncConnection.connect(str(url), connect_timeout=2)).close()
            return True
        return False


def _set_role(conn: psycopg.Connection[tuple[object, ...]], role: str) -> None:
    conn.execute(_set_role_statement(role))


def _set_role_statement(role: str) -> sql.Composed:
    return sql.SQL("SET ROLE {}").format(sql.Identifier(role))


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
