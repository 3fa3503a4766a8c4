"""The expiry sweeper: every idle and absolute expiry is an event within a sweep of its deadline,
dated at the deadline, decided as a live request decides it; one sweeper at a time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from projections.session import replay
from projections.sql.inline import load_session
from projections.sql.sweeper import SWEEP_LOCK, ExpirySweeper
from projections.streams import session_stream_id
from tests.api.conftest import TEST_POLICY, LiveServer, sid
from tests.waiting import wait_until

IDLE, ABSOLUTE = TEST_POLICY.idle_timeout, TEST_POLICY.absolute_timeout
US = timedelta(microseconds=1)


@pytest.fixture
def sweeper(live: LiveServer) -> ExpirySweeper:
    return ExpirySweeper(live.pool, clock=live.clock.now, policy=TEST_POLICY)


def _ends(live: LiveServer) -> list[tuple[str, object]]:
    return [
        (e.stream_id, e.event.reason)  # type: ignore[attr-defined]
        for e in live.events("session:")
        if e.type == "SessionEnded"
    ]


def test_an_idle_session_ends_at_its_deadline_without_a_request(
    live: LiveServer, sweeper: ExpirySweeper
) -> None:
    logged_in_at = live.clock.now()
    tokens = live.login()
    live.clock.advance(IDLE - US)
    assert sweeper.sweep() == 0  # a microsecond before its deadline it is still valid
    live.clock.advance(US + timedelta(seconds=3))
    assert sweeper.sweep() == 1
    [ended] = [e for e in live.events("session:") if e.type == "SessionEnded"]
    assert ended.data == {"reason": "idle_timeout"}
    assert ended.occurred_at == logged_in_at + IDLE  # dated at the deadline, not the sweep
    assert ended.metadata["request_id"] == "expiry-sweeper"
    # The request that comes later finds it ended and records nothing more.
    refused = live.refresh(str(tokens["refresh_token"]))
    assert refused.json()["error_description"] == "the session expired after inactivity"
    assert sweeper.sweep() == 0
    assert len(_ends(live)) == 1


def test_an_active_session_ends_at_its_absolute_deadline(
    live: LiveServer, sweeper: ExpirySweeper
) -> None:
    logged_in_at = live.clock.now()
    tokens = live.login()
    refresh_token = str(tokens["refresh_token"])
    while live.clock.now() + IDLE / 2 < logged_in_at + ABSOLUTE:
        live.clock.advance(IDLE / 2)
        refresh_token = live.refresh(refresh_token).json()["refresh_token"]
        assert sweeper.sweep() == 0
    live.clock.advance(IDLE / 2)
    assert sweeper.sweep() == 1
    ended = live.events("session:")[-1]
    assert (ended.type, ended.occurred_at) == ("SessionEnded", logged_in_at + ABSOLUTE)
    assert ended.data == {"reason": "absolute_timeout"}


def test_the_projection_row_is_the_fold_of_the_events_after_a_sweep(
    live: LiveServer, sweeper: ExpirySweeper
) -> None:
    session_id = sid(live.login())
    live.clock.advance(IDLE)
    assert sweeper.sweep() == 1
    folded = replay(session_id, [e.event for e in live.events(session_stream_id(session_id))])
    with live.pool.connection() as conn:
        assert load_session(conn, session_id, for_update=False) == folded


def test_sweeps_go_on_past_one_batch(live: LiveServer) -> None:
    for _ in range(5):
        live.login()
    live.clock.advance(IDLE)
    small = ExpirySweeper(live.pool, clock=live.clock.now, policy=TEST_POLICY, batch_size=2)
    assert small.sweep() == 5
    assert len(_ends(live)) == 5


def test_only_one_sweeper_is_active_at_a_time(live: LiveServer, sweeper: ExpirySweeper) -> None:
    live.login()
    live.clock.advance(IDLE)
    with live.pool.connection() as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s, %s)", SWEEP_LOCK)
        assert sweeper.sweep() == 0
    assert sweeper.sweep() == 1


def test_a_session_a_request_holds_is_left_to_that_request(
    live: LiveServer, sweeper: ExpirySweeper
) -> None:
    session_id = sid(live.login())
    live.clock.advance(IDLE)
    with live.pool.connection() as other, other.transaction():
        load_session(other, session_id, for_update=True)
        assert sweeper.sweep() == 0
    assert sweeper.sweep() == 1


def test_the_server_runs_a_sweeper_of_its_own(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(expiry_sweep_interval=timedelta(seconds=1))
    live.login()
    live.clock.advance(IDLE)
    wait_until(lambda: len(_ends(live)) == 1, timeout=10, what="the server's sweeper")
    assert _ends(live)[0][1] == "idle_timeout"
