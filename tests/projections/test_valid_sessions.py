"""The SQL that lists a user's valid sessions says exactly what session.status says, at the
edges of the idle and absolute limits too, and ended or expired sessions never crowd it."""

from __future__ import annotations

import uuid
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from projections import session
from projections.session import SessionState
from projections.sql.inline import save_session, user_sessions, valid_user_sessions
from tests.projections.histories import POLICY, T0

NOW = T0 + POLICY.absolute_timeout * 2  # when the listing is asked for
TICK = timedelta(microseconds=1)
EDGES = [POLICY.idle_timeout, POLICY.absolute_timeout, timedelta(0), timedelta(minutes=5)]
# How long ago something happened: exactly at an edge, or one microsecond either side.
ago = st.sampled_from(EDGES).flatmap(lambda edge: st.sampled_from([edge - TICK, edge, edge + TICK]))


def _state(user: str, n: int, started_ago: timedelta, idle: timedelta, ended: bool) -> SessionState:
    started = NOW - started_ago
    return SessionState(
        session_id=f"{user}-{n}",
        version=1,
        user=user,
        client_id="spa",
        scope=(),
        started_at=started,
        last_activity=max(started, NOW - idle),
        generation=1,
        ended_at=started if ended else None,
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(ago, ago, st.booleans()), min_size=1, max_size=12))
def test_the_valid_listing_is_the_status_rule_in_sql(
    pool: ConnectionPool, rows: list[tuple[timedelta, timedelta, bool]]
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    with pool.connection() as conn:
        for n, row in enumerate(rows):
            save_session(conn, _state(user, n, *row))
        listed = valid_user_sessions(conn, user, NOW, POLICY, 100)
        everything = user_sessions(conn, user, 100)
    assert listed == [s for s in everything if session.is_valid(s, NOW, POLICY)]


def test_ended_sessions_do_not_crowd_an_older_valid_one_out(pool: ConnectionPool) -> None:
    valid = _state("ada", 0, timedelta(hours=1), timedelta(0), ended=False)
    ended = [_state("ada", n, timedelta(seconds=n), timedelta(0), ended=True) for n in range(1, 6)]
    with pool.connection() as conn:
        for state in [valid, *ended]:
            save_session(conn, state)
        newest = user_sessions(conn, "ada", 5)
        assert [s.session_id for s in newest] == [s.session_id for s in ended]
        assert valid_user_sessions(conn, "ada", NOW, POLICY, 5) == [valid]
