"""One fold, three readers: for random histories written as the service writes them, the inline
rows, a full rebuild and the point-in-time replay at each session's last event agree exactly;
every projection's rebuild check finds no drift."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from datetime import timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from ledger.clock import ManualClock
from ledger.store import EventStore
from projections import principal
from projections.replay import as_of, what_if
from projections.session import Outcome
from projections.sql.catalog import CATCH_UP, PROJECTIONS
from projections.sql.inline import load_principal, load_session
from projections.sql.rebuild import rebuild
from projections.sql.runner import Runner
from projections.streams import principal_stream_id
from tests.projections.histories import (
    POLICY,
    T0,
    Writer,
    all_events,
    stream_events,
)

Op = tuple[str, int, int]

# A compressed policy, so that few steps reach every rule: grace 10 s, debounce 60 s as usual.
FAST = dataclasses.replace(
    POLICY, idle_timeout=timedelta(minutes=10), absolute_timeout=timedelta(minutes=40)
)
# Seconds: inside and just past the grace window, the debounce interval, the idle timeout and the
# absolute lifetime; now and then anything up to three hours.
SHORT_WAITS = st.sampled_from([1, 5, 10, 11, 30, 59, 60, 61, 120])
LONG_WAITS = st.sampled_from([300, 599, 600, 601, 1200, 2400])
WAITS = st.one_of(SHORT_WAITS, SHORT_WAITS, LONG_WAITS, st.integers(0, 3 * 3600))
SESSION = st.integers(0, 3)  # 0: the newest session of the example, 1: the one before, ...
KINDS = ["login"] * 3 + ["refresh"] * 4 + ["activity"] * 3 + ["logout", "expire", "fail"]
KINDS += ["wait"] * 4


def op(kind: str) -> st.SearchStrategy[Op]:
    if kind == "wait":  # seconds, microseconds
        return st.tuples(st.just(kind), WAITS, st.integers(0, 999_999))
    if kind == "login":  # user, address
        return st.tuples(st.just(kind), st.integers(0, 2), st.integers(0, 2))
    if kind == "fail":  # user, failures in a row (a lockout takes five, a burst ten)
        return st.tuples(st.just(kind), st.integers(0, 2), st.integers(1, 11))
    if kind == "refresh":  # generation offset: 0 current, 1 previous, 2 stale, -1 not issued
        return st.tuples(st.just(kind), SESSION, st.sampled_from([0, 0, 0, 1, 1, 2, -1]))
    return st.tuples(st.just(kind), SESSION, st.just(0))


OPS = st.sampled_from(KINDS).flatmap(op)
HISTORIES = st.lists(OPS, min_size=8, max_size=30).map(lambda ops: [("login", 0, 0), *ops])
# Every rule at least once: rotation, a grace retry, reuse, activity, idle expiry recorded by a
# refused refresh, absolute expiry, lockout, a failure burst, a refused login while locked,
# logout, a sweep.
EVERY_RULE: list[Op] = [
    ("login", 0, 0),
    ("refresh", 0, 0),
    ("wait", 5, 0),
    ("refresh", 0, 1),
    ("wait", 11, 0),
    ("refresh", 0, 1),
    ("login", 1, 1),
    ("wait", 300, 0),
    ("activity", 0, 0),
    ("wait", 599, 0),
    ("refresh", 0, 0),
    ("wait", 600, 0),
    ("refresh", 0, 0),
    ("login", 2, 2),
    *[("wait", 540, 0), ("refresh", 0, 0)] * 5,
    ("fail", 0, 11),
    ("login", 0, 0),
    ("wait", 901, 0),
    ("login", 0, 0),
    ("logout", 0, 0),
    ("wait", 7200, 1),
    ("expire", 2, 0),
]
EXAMPLES = itertools.count()


def play(writer: Writer, ops: list[Op], users: list[str], addresses: list[str]) -> None:
    for kind, a, b in ops:
        if kind == "wait":
            writer.advance(timedelta(seconds=a, microseconds=b))
        elif kind == "login":
            writer.login(users[a], ip=addresses[b])
        elif kind == "fail":
            for _ in range(b):
                writer.fail(users[a], ip=addresses[a])
                writer.advance(timedelta(seconds=20))
        elif writer.sessions:
            session_id = writer.sessions[-1 - a % len(writer.sessions)]
            if kind == "refresh":
                writer.refresh(session_id, writer.state(session_id).generation - b)
            elif kind == "activity":
                writer.activity(session_id)
            elif kind == "logout":
                writer.logout(session_id)
            else:
                writer.expire(session_id)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=HISTORIES)
@example(ops=EVERY_RULE)
def test_inline_rows_rebuild_and_point_in_time_replay_agree(
    ops: list[Op], db_url: str, pool: ConnectionPool, store: EventStore
) -> None:
    # The database outlives the example (events cannot be deleted): fresh names and a fresh
    # stretch of time per example, and only this example's sessions compared one by one.
    n, tag = next(EXAMPLES), uuid.uuid4().hex[:8]
    clock = ManualClock(T0 + timedelta(days=30 * n))
    writer = Writer(pool, store, clock, policy=FAST, prefix=f"{tag}-")
    users = [f"{tag}-{name}" for name in ("ada", "bob", "cy")]
    addresses = [f"2001:db8:{n:x}::{i}" for i in range(3)]

    play(writer, ops, users, addresses)

    with pool.connection() as conn:
        for session_id in writer.sessions:
            events = stream_events(store, session_id)
            inline = load_session(conn, session_id, for_update=False)
            replayed = as_of(session_id, events, events[-1].occurred_at, FAST).state
            assert inline == replayed, session_id
            assert inline is not None
            assert inline.version == len(events)
        for user in users:
            recorded = [r.event for r in store.read_stream(principal_stream_id(user))]
            stored = load_principal(conn, user, for_update=False)
            assert stored == principal.replay(user, recorded), user
    for name in ("sessions", "principals"):
        drift = rebuild(db_url, store, PROJECTIONS[name], check=True)
        assert drift == [], [str(d) for d in drift]
    Runner(db_url, pool, batch_size=7).run_once()
    for projection in CATCH_UP:
        drift = rebuild(db_url, store, projection, check=True)
        assert drift == [], [str(d) for d in drift]
    unchanged = what_if(all_events(store), FAST, FAST)
    assert (unchanged.earlier, unchanged.later) == ([], [])


def test_racing_requests_keep_inline_rows_and_point_in_time_replay_in_agreement(
    pool: ConnectionPool, store: EventStore
) -> None:
    """Two requests for one session, the one that read the clock first decided second: its
    decision is dated no earlier than the stream's last event (SessionService._now), so the
    stream's times never run backwards and point-in-time replay agrees with the inline row."""
    writer = Writer(pool, store, ManualClock(T0))
    session_id = writer.login("ada")
    assert session_id is not None
    first_read = writer.advance(timedelta(minutes=2))  # the refresh request reads the clock
    writer.advance(timedelta(seconds=1))
    assert writer.activity(session_id).events  # the activity request gets the lock first
    refreshed = writer.refresh(session_id, 1, now=first_read)  # then the refresh is decided
    assert refreshed.outcome is Outcome.OK

    events = stream_events(store, session_id)
    with pool.connection() as conn:
        inline = load_session(conn, session_id, for_update=False)
    replayed = as_of(session_id, events, events[-1].occurred_at, POLICY)

    assert replayed.state == inline
