"""Histories for the projection tests, written exactly the way the session service writes them.

`Writer` is `SessionService`'s write path without HTTP or tokens: one transaction per command that
locks the projection row (`load_session(..., for_update=True)` or `load_principal`), decides,
appends at the row's version and saves the folded row. With `conn=`, a command joins the caller's
open transaction instead, so a test can hold a writer's transaction open.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from ledger.clock import ManualClock
from ledger.events import Event
from ledger.records import RecordedEvent
from ledger.store import EventStore
from projections import principal, session
from projections.principal import LockoutPolicy, PrincipalState
from projections.session import Decision, Policy, SessionState
from projections.sql.catalog import Projection
from projections.sql.inline import (
    load_principal,
    load_session,
    save_principal,
    save_session,
)
from projections.streams import client_stream, principal_stream, session_stream, session_stream_id

Connection = psycopg.Connection[TupleRow]
Admin = psycopg.Connection[tuple[object, ...]]

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
POLICY = Policy()  # idle 60 min, absolute 8 h, grace 10 s, debounce 60 s
LOCKOUT = LockoutPolicy()  # 5 failures within 15 min
CLIENT = "web"


class Writer:
    """Login, refresh, activity, logout, expiry and failed logins, as SessionService writes them."""

    def __init__(
        self,
        pool: ConnectionPool,
        store: EventStore,
        clock: ManualClock,
        *,
        policy: Policy = POLICY,
        lockout: LockoutPolicy = LOCKOUT,
        prefix: str = "",
    ) -> None:
        self.pool = pool
        self.store = store
        self.clock = clock
        self.policy = policy
        self.lockout = lockout
        self.prefix = prefix
        self.sessions: list[str] = []
        self.requests = 0

    def advance(self, delta: timedelta) -> datetime:
        return self.clock.advance(delta)

    @contextmanager
    def transaction(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn  # the caller's transaction: the caller commits
            return
        with self.pool.connection() as own, own.transaction():
            yield own

    def login(
        self,
        user: str,
        *,
        ip: str | None = "192.0.2.1",
        user_agent: str | None = "Firefox",
        conn: Connection | None = None,
    ) -> str | None:
        """A successful password check: a new session, or a LOCKED failure when locked out."""
        now = self.clock.now()
        with self.transaction(conn) as tx:
            state = load_principal(tx, user, for_update=True)
            if principal.is_locked(state, now):
                self._record_failure(tx, state, principal.LOCKED, ip, user_agent, now)
                return None
        session_id = f"{self.prefix}s{len(self.sessions) + 1}-{uuid.uuid4().hex[:8]}"
        started = session.start(
            user=user,
            client_id=CLIENT,
            scope=("openid", "profile"),
            refresh_token_hash=f"hash-{session_id}-1",
            ip=ip,
            user_agent=user_agent,
            now=now,
        )
        with self.transaction(conn) as tx:
            self.store.append(session_stream(session_id), 0, [started], self._meta(ip), conn=tx)
            save_session(tx, session.evolve(None, session_id, started))
        self.sessions.append(session_id)
        return session_id

    def fail(
        self,
        user: str,
        *,
        ip: str | None = "192.0.2.66",
        reason: str = "wrong_password",
        conn: Connection | None = None,
    ) -> tuple[Event, ...]:
        """A failed login of `user` (recorded as LOCKED while the user is locked out)."""
        now = self.clock.now()
        with self.transaction(conn) as tx:
            state = load_principal(tx, user, for_update=True)
            return self._record_failure(tx, state, reason, ip, "curl", now)

    def fail_client(self, client_id: str, *, ip: str | None = "192.0.2.66") -> tuple[Event, ...]:
        """A failed authentication as the client `client_id` (a wrong secret)."""
        now = self.clock.now()
        with self.transaction(None) as tx:
            state = load_principal(tx, client_id, for_update=True, table="client_lockouts")
            return self._record_failure(tx, state, "wrong_secret", ip, "curl", now, client=True)

    def refresh(
        self,
        session_id: str,
        generation: int,
        *,
        ip: str | None = "192.0.2.1",
        conn: Connection | None = None,
        now: datetime | None = None,
    ) -> Decision:
        """Present the refresh token of `generation` (`now`: when the request read the clock)."""
        return self._decide(
            session_id,
            lambda s, at: session.decide_refresh(
                s,
                generation,
                next_token_hash=f"hash-{session_id}-{s.generation + 1}",
                ip=ip,
                user_agent="Firefox",
                now=at,
                policy=self.policy,
            ),
            conn,
            now,
        )

    def refresh_current(self, session_id: str, *, conn: Connection | None = None) -> Decision:
        return self.refresh(session_id, self.state(session_id).generation, conn=conn)

    def activity(
        self, session_id: str, *, conn: Connection | None = None, now: datetime | None = None
    ) -> Decision:
        return self._decide(
            session_id, lambda s, at: session.decide_activity(s, at, self.policy), conn, now
        )

    def logout(self, session_id: str, *, conn: Connection | None = None) -> Decision:
        return self._decide(
            session_id, lambda s, at: session.decide_end(s, "logout", at, self.policy), conn
        )

    def expire(self, session_id: str, *, conn: Connection | None = None) -> Decision:
        """Record the session's expiry if it has passed (a sweep)."""
        return self._decide(
            session_id, lambda s, at: session.decide_expiry(s, at, self.policy), conn
        )

    def state(self, session_id: str) -> SessionState:
        """The inline projection's row."""
        with self.pool.connection() as conn:
            state = load_session(conn, session_id, for_update=False)
        assert state is not None, session_id
        return state

    def _decide(
        self,
        session_id: str,
        decide: Callable[[SessionState, datetime], Decision],
        conn: Connection | None,
        read_at: datetime | None = None,
    ) -> Decision:
        """`read_at`: when the request read the clock, if before it got the row lock; like
        SessionService._now, the decision is never dated before the stream's last event."""
        with self.transaction(conn) as tx:  # SessionService._decide and _apply
            state = load_session(tx, session_id, for_update=True)
            assert state is not None, session_id
            at = max(read_at or self.clock.now(), session.last_event_at(state))
            decision = decide(state, at)
            if decision.events:
                self.store.append(
                    session_stream(session_id),
                    state.version,
                    decision.events,
                    self._meta(None),
                    conn=tx,
                )
                for event in decision.events:
                    state = session.evolve(state, session_id, event)
                save_session(tx, state)
        return decision

    def _record_failure(
        self,
        conn: Connection,
        state: PrincipalState,
        reason: str,
        ip: str | None,
        user_agent: str | None,
        now: datetime,
        *,
        client: bool = False,
    ) -> tuple[Event, ...]:
        events = principal.decide_failure(
            state, reason, ip=ip, user_agent=user_agent, now=now, policy=self.lockout, client=client
        )
        stream = client_stream(state.name) if client else principal_stream(state.name)
        self.store.append(stream, state.version, events, self._meta(ip), conn=conn)
        for event in events:
            state = principal.evolve(state, event)
        save_principal(conn, state, table="client_lockouts" if client else "principals")
        return events

    def _meta(self, ip: str | None) -> dict[str, object]:
        self.requests += 1
        return {"request_id": f"req-{self.requests}", "ip": ip, "client_id": CLIENT}


def write_varied_history(writer: Writer) -> list[str]:
    """Sessions that log out, rotate, retry in grace, reuse a token, idle out (recorded or not),
    reach the absolute end; failed logins with a lockout and a burst from one address; failed
    client authentications that lock a client."""
    w = writer
    a = _login(w, "ada")
    w.advance(timedelta(minutes=2))
    w.refresh_current(a)
    w.advance(timedelta(seconds=5))
    w.refresh(a, 1)  # a retry within the grace window: RefreshTokenRetried
    b = _login(w, "bob", ip="198.51.100.7")
    w.advance(timedelta(minutes=3))
    w.activity(a)
    w.refresh_current(b)
    w.advance(timedelta(minutes=1))
    w.refresh(b, 1)  # outside the grace window: reuse, the session is revoked
    w.logout(a)
    c = _login(w, "ada")
    w.activity(c)
    for _ in range(6):  # the fifth failure within the window locks ada out
        w.fail("ada", ip="203.0.113.9")
        w.advance(timedelta(seconds=30))
    w.login("ada")  # refused while locked: a LOCKED failure
    for n in range(11):  # a burst from one address
        w.fail(f"guess{n}", ip="203.0.113.50")
        w.advance(timedelta(seconds=20))
    d = _login(w, "cy")
    w.advance(timedelta(minutes=90))
    w.refresh_current(c)  # c idled out: the refused refresh records the expiry at its moment
    w.expire(d)  # a sweep records d's idle expiry
    e = _login(w, "dee")
    f = _login(w, "eve")  # never seen again: its idle expiry is never recorded
    for _ in range(9):  # the ninth refresh comes after the absolute end, which it records
        w.advance(timedelta(minutes=55))
        w.refresh_current(e)
    for _ in range(6):  # the fifth wrong secret within the window locks the client
        w.fail_client("backend", ip="203.0.113.77")
    return [a, b, c, d, e, f]


def _login(writer: Writer, user: str, ip: str = "192.0.2.1") -> str:
    session_id = writer.login(user, ip=ip)
    assert session_id is not None
    return session_id


def all_events(store: EventStore, batch: int = 1000) -> list[RecordedEvent]:
    """Every committed event, in the gap-safe order."""
    return list(store.iter_all(page=batch))


def stream_events(store: EventStore, session_id: str) -> list[Event]:
    return [r.event for r in store.read_stream(session_stream_id(session_id))]


def table_rows(conn: Admin | Connection, table: str) -> list[tuple[Any, ...]]:
    """A table's full contents, in a stable order."""
    query = sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(table))
    return [tuple(row) for row in conn.execute(query)]


def snapshot(conn: Admin, tables: Sequence[str]) -> dict[str, list[tuple[Any, ...]]]:
    return {table: table_rows(conn, table) for table in tables}


# -- a counting projection: one row per event position, with the number of times applied --------

COUNTING_TABLE = "applied"


def create_counting_table(admin: Admin) -> None:
    admin.execute(
        "CREATE TABLE applied (position bigint PRIMARY KEY, times integer NOT NULL, batch text)"
    )


def counting_projection(
    *,
    tag: str = "",
    before: Callable[[Connection, Sequence[RecordedEvent]], None] | None = None,
    name: str = "counting",
) -> Projection:
    """A catch-up projection that counts how often each event was applied (`times`)."""

    def apply(
        _: EventStore, conn: Connection, events: Sequence[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        if before is not None:
            before(conn, events)
        query = sql.SQL(
            "INSERT INTO {} AS t (position, times, batch) VALUES (%s, 1, %s)"
            " ON CONFLICT (position) DO UPDATE SET times = t.times + 1, batch = EXCLUDED.batch"
        ).format(sql.Identifier(tables[COUNTING_TABLE]))
        batch = f"{tag}:{events[0].position}"
        with conn.cursor() as cursor:
            cursor.executemany(query, [(e.position, batch) for e in events])

    return Projection(name, {COUNTING_TABLE: ("position",)}, apply, False, "test: applications")


def applied_times(admin: Admin) -> dict[int, int]:
    rows = admin.execute("SELECT position, times FROM applied").fetchall()
    return {int(str(p)): int(str(t)) for p, t in rows}


def positions(admin: Admin) -> list[int]:
    return [int(str(p)) for (p,) in admin.execute("SELECT position FROM events ORDER BY 1")]
