"""Lockout of a principal after repeated failed logins: the fold and `decide_failure`, pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.events import Event, LoginFailed, PrincipalLocked
from projections.principal import (
    LOCKED,
    LockoutPolicy,
    PrincipalState,
    decide_failure,
    evolve,
    is_locked,
    replay,
)

NAME = "alice"
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
POLICY = LockoutPolicy()  # 5 failures within 15 min
WINDOW = POLICY.window
US = timedelta(microseconds=1)


def minutes(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


def fail(
    history: list[Event],
    now: datetime,
    policy: LockoutPolicy = POLICY,
    reason: str = "bad_password",
) -> tuple[Event, ...]:
    """Decide one failed login on the folded history and append its events to the history."""
    events = decide_failure(
        replay(NAME, history), reason, ip="10.0.0.1", user_agent="ua-1", now=now, policy=policy
    )
    history.extend(events)
    return events


def fail_at(
    history: list[Event], times: list[datetime], policy: LockoutPolicy = POLICY
) -> list[Event]:
    return [event for now in times for event in fail(history, now, policy)]


def locks(events: list[Event]) -> list[PrincipalLocked]:
    return [e for e in events if isinstance(e, PrincipalLocked)]


def test_failure_is_recorded_with_its_reason_and_origin() -> None:
    events = fail([], T0)
    assert events == (
        LoginFailed(occurred_at=T0, reason="bad_password", ip="10.0.0.1", user_agent="ua-1"),
    )


def test_fewer_than_max_failures_within_window_do_not_lock() -> None:
    history: list[Event] = []
    assert locks(fail_at(history, [minutes(m) for m in range(4)])) == []
    assert not is_locked(replay(NAME, history), minutes(4))


def test_max_failures_within_window_lock_until_oldest_plus_window() -> None:
    history: list[Event] = []
    fail_at(history, [minutes(m) for m in range(4)])
    assert fail(history, minutes(4)) == (
        LoginFailed(
            occurred_at=minutes(4), reason="bad_password", ip="10.0.0.1", user_agent="ua-1"
        ),
        PrincipalLocked(occurred_at=minutes(4), until=T0 + WINDOW, failures=5),
    )
    state = replay(NAME, history)
    assert state.locked_until == T0 + WINDOW
    assert is_locked(state, minutes(4))


def test_failure_exactly_one_window_old_no_longer_counts() -> None:
    history: list[Event] = []
    assert locks(fail_at(history, [T0, minutes(1), minutes(2), minutes(3), T0 + WINDOW])) == []
    # T0 has dropped out; the next failure makes five with minute 1 the oldest.
    assert locks(fail_at(history, [T0 + WINDOW + US])) == [
        PrincipalLocked(occurred_at=T0 + WINDOW + US, until=minutes(1) + WINDOW, failures=5)
    ]


def test_failure_one_microsecond_inside_window_still_counts() -> None:
    history: list[Event] = []
    fail_at(history, [T0, minutes(1), minutes(2), minutes(3)])
    assert locks(fail_at(history, [T0 + WINDOW - US])) == [
        PrincipalLocked(occurred_at=T0 + WINDOW - US, until=T0 + WINDOW, failures=5)
    ]


def test_lock_runs_from_the_oldest_of_the_last_max_failures_in_window() -> None:
    history: list[Event] = []
    assert locks(fail_at(history, [T0, minutes(1)])) == []
    assert locks(fail_at(history, [minutes(20), minutes(21), minutes(22), minutes(23)])) == []
    assert locks(fail_at(history, [minutes(24)])) == [
        PrincipalLocked(occurred_at=minutes(24), until=minutes(20) + WINDOW, failures=5)
    ]


def test_attempts_while_locked_are_recorded_as_locked_and_do_not_count() -> None:
    history: list[Event] = []
    fail_at(history, [minutes(m) for m in range(5)])
    locked = replay(NAME, history)
    for now in [minutes(5), minutes(10), T0 + WINDOW - US]:
        assert fail(history, now) == (
            LoginFailed(occurred_at=now, reason=LOCKED, ip="10.0.0.1", user_agent="ua-1"),
        )
    after = replay(NAME, history)
    assert after.recent_failures == locked.recent_failures
    assert after.locked_until == T0 + WINDOW


def test_lock_ends_exactly_at_until() -> None:
    history: list[Event] = []
    fail_at(history, [minutes(m) for m in range(5)])
    state = replay(NAME, history)
    assert is_locked(state, T0 + WINDOW - US)
    assert not is_locked(state, T0 + WINDOW)
    assert fail(history, T0 + WINDOW) == (
        LoginFailed(
            occurred_at=T0 + WINDOW, reason="bad_password", ip="10.0.0.1", user_agent="ua-1"
        ),
    )


def test_counting_starts_afresh_after_a_lock() -> None:
    history: list[Event] = []
    fail_at(history, [minutes(m) for m in range(10, 15)])  # locked until minute 25
    # The failures of minutes 10 to 14 are still inside the window but were spent on the lock.
    assert locks(fail_at(history, [minutes(25), minutes(26), minutes(27), minutes(28)])) == []
    assert locks(fail_at(history, [minutes(29)])) == [
        PrincipalLocked(occurred_at=minutes(29), until=minutes(25) + WINDOW, failures=5)
    ]


def test_locked_attempts_do_not_count_after_the_lock_ends() -> None:
    history: list[Event] = []
    fail_at(history, [minutes(m) for m in range(5)])  # locked until minute 15
    fail_at(history, [minutes(m) for m in range(10, 15)])  # five refused attempts
    assert locks(fail_at(history, [minutes(15), minutes(16), minutes(17), minutes(18)])) == []


def test_caller_reason_locked_does_not_count() -> None:
    state = replay(NAME, [LoginFailed(occurred_at=T0, reason=LOCKED, ip=None, user_agent=None)])
    assert state.recent_failures == ()


def test_max_failures_of_one_locks_on_the_first_failure() -> None:
    policy = LockoutPolicy(max_failures=1, window=timedelta(minutes=10))
    assert locks(list(fail([], minutes(3), policy))) == [
        PrincipalLocked(occurred_at=minutes(3), until=minutes(13), failures=1)
    ]


def test_replay_equals_folding_step_by_step() -> None:
    history: list[Event] = []
    fail_at(history, [minutes(m) for m in (0, 1, 2, 3, 4, 8, 15, 16, 40, 41)])
    state = PrincipalState(name=NAME)
    for event in history:
        state = evolve(state, event)
    assert replay(NAME, history) == state
    assert state.version == len(history)


# Property: the fold's lock equals a straightforward reference computation.


def reference_lockout(
    times: list[datetime], policy: LockoutPolicy
) -> tuple[list[bool], list[tuple[datetime, datetime]], list[datetime | None]]:
    """Per attempt whether it was refused as locked; the locks as (at, until); the lock's end
    as it stands after each attempt."""
    refused: list[bool] = []
    lock_list: list[tuple[datetime, datetime]] = []
    until_after: list[datetime | None] = []
    locked_until: datetime | None = None
    counted: list[datetime] = []
    for now in times:
        is_refused = locked_until is not None and now < locked_until
        refused.append(is_refused)
        if not is_refused:
            counted.append(now)
            in_window = [t for t in counted if now - t < policy.window]
            if len(in_window) >= policy.max_failures:
                locked_until = min(in_window[-policy.max_failures :]) + policy.window
                lock_list.append((now, locked_until))
                counted = []
        until_after.append(locked_until)
    return refused, lock_list, until_after


policies = st.builds(
    LockoutPolicy,
    max_failures=st.integers(min_value=1, max_value=6),
    window=st.sampled_from([timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1)]),
)
gaps = st.one_of(
    st.sampled_from(
        [timedelta(0), US, timedelta(minutes=5), timedelta(minutes=5) - US, timedelta(minutes=15)]
    ),
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(minutes=20)),
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, steps=st.lists(gaps, max_size=40))
def test_folded_lock_equals_reference_computation(
    policy: LockoutPolicy, steps: list[timedelta]
) -> None:
    times = [T0 + sum(steps[: i + 1], timedelta(0)) for i in range(len(steps))]
    expected_refused, expected_locks, expected_until = reference_lockout(times, policy)
    history: list[Event] = []
    state = PrincipalState(name=NAME)
    refused: list[bool] = []
    for now, until in zip(times, expected_until, strict=True):
        events = decide_failure(
            state, "bad_password", ip=None, user_agent=None, now=now, policy=policy
        )
        assert isinstance(events[0], LoginFailed)
        refused.append(events[0].reason == LOCKED)
        for event in events:
            state = evolve(state, event)
        history.extend(events)
        assert state.locked_until == until
        assert is_locked(state, now) == (until is not None and now < until)
    assert refused == expected_refused
    assert [(e.occurred_at, e.until) for e in locks(history)] == expected_locks
    assert replay(NAME, history) == state
