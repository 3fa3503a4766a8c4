"""Session fold and deciders, rule by rule: events in, fold, assert; time is always passed in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from ledger.events import (
    ActivityRecorded,
    DpopProofRefused,
    Event,
    RefreshTokenRetried,
    RefreshTokenReuseDetected,
    RefreshTokenRotated,
    SessionEnded,
    SessionStarted,
)
from ledger.serialization import format_timestamp
from projections.session import (
    RETRIES_KEPT,
    ROTATIONS_KEPT,
    Decision,
    NotASessionStream,
    Outcome,
    Policy,
    Retry,
    SessionState,
    absolute_end_of,
    decide_activity,
    decide_dpop,
    decide_end,
    decide_expiry,
    decide_refresh,
    evolve,
    expiry,
    idle_for,
    is_valid,
    last_event_at,
    replay,
    start,
    status,
)

SID = "session-1"
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
POLICY = Policy()  # idle 60 min, absolute 8 h, grace 10 s, debounce 60 s, refresh counts
NO_REFRESH_ACTIVITY = dataclasses.replace(POLICY, refresh_counts_as_activity=False)
IDLE = POLICY.idle_timeout
ABSOLUTE = POLICY.absolute_timeout
GRACE = POLICY.refresh_grace
DEBOUNCE = POLICY.activity_debounce
US = timedelta(microseconds=1)

Decider = Callable[[SessionState, datetime, Policy], Decision]


def begin(at: datetime = T0) -> list[Event]:
    """A history holding only the SessionStarted event."""
    return [
        start(
            user="alice",
            client_id="web",
            scope=("openid", "profile"),
            refresh_token_hash="hash-1",
            ip="10.0.0.1",
            user_agent="ua-login",
            now=at,
        )
    ]


def fold(history: list[Event]) -> SessionState:
    state = replay(SID, history)
    assert state is not None
    return state


def refresh(
    history: list[Event],
    presented: int,
    now: datetime,
    *,
    policy: Policy = POLICY,
    ip: str | None = "10.0.0.1",
    user_agent: str | None = "ua-1",
) -> Decision:
    """Decide a refresh on the folded history and append its events to the history."""
    state = fold(history)
    decision = decide_refresh(
        state,
        presented,
        next_token_hash=f"hash-{state.generation + 1}",
        ip=ip,
        user_agent=user_agent,
        now=now,
        policy=policy,
    )
    history.extend(decision.events)
    return decision


def activity(history: list[Event], now: datetime, policy: Policy = POLICY) -> Decision:
    decision = decide_activity(fold(history), now, policy)
    history.extend(decision.events)
    return decision


def _refresh_current(state: SessionState, now: datetime, policy: Policy) -> Decision:
    return decide_refresh(
        state,
        state.generation,
        next_token_hash="h",
        ip=None,
        user_agent=None,
        now=now,
        policy=policy,
    )


def _refresh_stale(state: SessionState, now: datetime, policy: Policy) -> Decision:
    return decide_refresh(
        state, 1, next_token_hash="h", ip=None, user_agent=None, now=now, policy=policy
    )


def _logout(state: SessionState, now: datetime, policy: Policy) -> Decision:
    return decide_end(state, "logout", now, policy)


DECIDERS: dict[str, Decider] = {
    "refresh_current": _refresh_current,
    "refresh_stale": _refresh_stale,
    "activity": decide_activity,
    "logout": _logout,
    "expiry": decide_expiry,
}


# Validity


def test_session_is_valid_right_after_start() -> None:
    state = fold(begin())
    assert is_valid(state, T0, POLICY)
    assert status(state, T0, POLICY) is Outcome.OK
    assert state.generation == 1
    assert state.started_at == state.last_activity == T0


def test_session_is_valid_until_one_microsecond_before_idle_limit() -> None:
    assert is_valid(fold(begin()), T0 + IDLE - US, POLICY)


def test_session_is_expired_exactly_at_idle_limit() -> None:
    state = fold(begin())
    assert not is_valid(state, T0 + IDLE, POLICY)
    assert status(state, T0 + IDLE, POLICY) is Outcome.IDLE_TIMEOUT


def test_session_is_expired_at_absolute_end_despite_recent_activity() -> None:
    history = begin()
    for minutes in range(30, 8 * 60, 30):
        assert activity(history, T0 + timedelta(minutes=minutes)).outcome is Outcome.OK
    state = fold(history)
    assert state.last_activity == T0 + timedelta(hours=7, minutes=30)
    assert is_valid(state, T0 + ABSOLUTE - US, POLICY)
    assert not is_valid(state, T0 + ABSOLUTE, POLICY)
    assert status(state, T0 + ABSOLUTE, POLICY) is Outcome.ABSOLUTE_TIMEOUT


def test_ended_session_is_invalid_though_within_both_limits() -> None:
    history = [*begin(), SessionEnded(occurred_at=T0 + timedelta(minutes=1), reason="logout")]
    state = fold(history)
    assert not is_valid(state, T0 + timedelta(minutes=2), POLICY)
    assert status(state, T0 + timedelta(minutes=2), POLICY) is Outcome.ENDED


def test_rotation_alone_does_not_move_last_activity() -> None:
    rotated = RefreshTokenRotated(
        occurred_at=T0 + timedelta(minutes=50),
        generation=2,
        refresh_token_hash="h",
        ip=None,
        user_agent=None,
    )
    state = fold([*begin(), rotated])
    assert state.last_activity == T0
    assert state.generation == 2
    assert not is_valid(state, T0 + IDLE, POLICY)


def test_activity_recorded_moves_last_activity_and_idle_clock() -> None:
    state = fold([*begin(), ActivityRecorded(occurred_at=T0 + timedelta(minutes=50))])
    assert state.last_activity == T0 + timedelta(minutes=50)
    assert idle_for(state, T0 + timedelta(minutes=80)) == timedelta(minutes=30)
    assert is_valid(state, T0 + timedelta(minutes=109), POLICY)
    assert not is_valid(state, T0 + timedelta(minutes=110), POLICY)


def test_idle_for_is_never_negative() -> None:
    assert idle_for(fold(begin()), T0 - timedelta(minutes=5)) == timedelta(0)


def test_expiry_names_the_earlier_of_idle_and_absolute_end() -> None:
    fresh = fold(begin())
    assert expiry(fresh, POLICY) == (T0 + IDLE, Outcome.IDLE_TIMEOUT)
    late = fold([*begin(), ActivityRecorded(occurred_at=T0 + timedelta(hours=7, minutes=30))])
    assert absolute_end_of(late, POLICY) == T0 + ABSOLUTE
    assert expiry(late, POLICY) == (T0 + ABSOLUTE, Outcome.ABSOLUTE_TIMEOUT)


# Refresh with the current generation


def test_refresh_with_current_generation_rotates_and_records_activity() -> None:
    history = begin()
    now = T0 + timedelta(minutes=5)
    decision = refresh(history, 1, now, ip="10.0.0.9", user_agent="ua-9")
    assert decision.outcome is Outcome.OK
    assert decision.is_granted
    assert decision.events == (
        RefreshTokenRotated(
            occurred_at=now,
            generation=2,
            refresh_token_hash="hash-2",
            ip="10.0.0.9",
            user_agent="ua-9",
        ),
        ActivityRecorded(occurred_at=now),
    )
    state = fold(history)
    assert state.generation == 2
    assert state.last_activity == now


def test_refresh_within_activity_debounce_rotates_without_activity() -> None:
    history = begin()
    decision = refresh(history, 1, T0 + DEBOUNCE - US)
    assert decision.outcome is Outcome.OK
    assert [type(e) for e in decision.events] == [RefreshTokenRotated]
    assert fold(history).last_activity == T0


def test_refresh_exactly_at_activity_debounce_records_activity() -> None:
    decision = refresh(begin(), 1, T0 + DEBOUNCE)
    assert [type(e) for e in decision.events] == [RefreshTokenRotated, ActivityRecorded]


def test_refresh_records_no_activity_when_policy_says_refresh_is_not_activity() -> None:
    history = begin()
    now = T0 + timedelta(minutes=50)
    decision = refresh(history, 1, now, policy=NO_REFRESH_ACTIVITY)
    assert decision.outcome is Outcome.OK
    assert [type(e) for e in decision.events] == [RefreshTokenRotated]
    state = fold(history)
    assert state.generation == 2
    assert state.last_activity == T0
    assert not is_valid(state, T0 + IDLE, NO_REFRESH_ACTIVITY)


def test_refresh_counted_as_activity_slides_the_idle_deadline() -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=50))
    assert is_valid(fold(history), T0 + timedelta(minutes=109), POLICY)


def test_successive_refreshes_advance_the_generation_one_by_one() -> None:
    history = begin()
    for generation in range(1, 5):
        decision = refresh(history, generation, T0 + timedelta(minutes=generation))
        assert decision.outcome is Outcome.OK
        assert isinstance(decision.events[0], RefreshTokenRotated)
        assert decision.events[0].generation == generation + 1
    assert fold(history).generation == 5


# Refresh with the previous generation: grace retry or reuse


def test_previous_generation_within_grace_is_a_retry_recorded_with_its_request() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at)
    retried_at = rotated_at + timedelta(seconds=3)
    decision = refresh(history, 1, retried_at, ip="192.0.2.9", user_agent="ua-other")
    retried = RefreshTokenRetried(
        occurred_at=retried_at, generation=1, ip="192.0.2.9", user_agent="ua-other"
    )
    assert decision == Decision((retried,), Outcome.GRACE_RETRY)
    assert decision.is_granted
    state = fold(history)
    assert state.generation == 2
    assert state.rotations[-1].retries == (Retry(retried_at, "192.0.2.9", "ua-other"),)
    assert last_event_at(state) == retried_at


def test_previous_generation_exactly_at_grace_limit_is_a_retry() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at)
    assert refresh(history, 1, rotated_at + GRACE).outcome is Outcome.GRACE_RETRY


def test_previous_generation_one_microsecond_past_grace_is_reuse() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at)
    decision = refresh(history, 1, rotated_at + GRACE + US)
    assert decision.outcome is Outcome.REUSE_DETECTED
    assert not decision.is_granted


def test_grace_is_measured_from_the_rotation_not_from_the_last_retry() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at)
    assert refresh(history, 1, rotated_at + timedelta(seconds=8)).outcome is Outcome.GRACE_RETRY
    assert refresh(history, 1, rotated_at + timedelta(seconds=11)).outcome is Outcome.REUSE_DETECTED


def test_reuse_records_evidence_of_both_uses_and_ends_the_session() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at, ip="10.0.0.1", user_agent="ua-honest")
    refresh(history, 2, rotated_at + timedelta(minutes=1), ip="10.0.0.1", user_agent="ua-honest")
    reused_at = rotated_at + timedelta(minutes=2)
    decision = refresh(history, 2, reused_at, ip="192.0.2.66", user_agent="ua-thief")
    assert decision.outcome is Outcome.REUSE_DETECTED
    assert decision.events == (
        RefreshTokenReuseDetected(
            occurred_at=reused_at,
            presented_generation=2,
            current_generation=3,
            first_use={
                "at": format_timestamp(rotated_at + timedelta(minutes=1)),
                "ip": "10.0.0.1",
                "user_agent": "ua-honest",
            },
            grace_retries=(),
            reuse={"at": format_timestamp(reused_at), "ip": "192.0.2.66", "user_agent": "ua-thief"},
        ),
        SessionEnded(occurred_at=reused_at, reason="reuse_detected"),
    )
    state = fold(history)
    assert not is_valid(state, reused_at, POLICY)
    assert status(state, reused_at, POLICY) is Outcome.ENDED
    assert state.end_reason == "reuse_detected"


def test_older_generation_is_reuse_even_within_grace() -> None:
    history = begin()
    first_at = T0 + timedelta(minutes=1)
    refresh(history, 1, first_at, ip="10.0.0.1", user_agent="ua-a")
    refresh(history, 2, first_at + timedelta(seconds=1), ip="10.0.0.2", user_agent="ua-b")
    reused_at = first_at + timedelta(seconds=2)
    decision = refresh(history, 1, reused_at, ip="10.0.0.3", user_agent="ua-c")
    assert decision.outcome is Outcome.REUSE_DETECTED
    evidence = decision.events[0]
    assert isinstance(evidence, RefreshTokenReuseDetected)
    assert (evidence.presented_generation, evidence.current_generation) == (1, 3)
    # The rotation that retired generation 1, not the latest one.
    assert evidence.first_use == {
        "at": format_timestamp(first_at),
        "ip": "10.0.0.1",
        "user_agent": "ua-a",
    }
    assert evidence.reuse == {
        "at": format_timestamp(reused_at),
        "ip": "10.0.0.3",
        "user_agent": "ua-c",
    }
    assert [type(e) for e in decision.events] == [RefreshTokenReuseDetected, SessionEnded]


def test_hardening_5_reuse_evidence_names_a_thief_who_retried_in_grace() -> None:
    """The owner rotates; a thief replays the spent token 2 s later from elsewhere and gets the
    successor; the owner's next refresh is then the detected reuse. The evidence shows the
    thief's retry beside the owner's uses."""
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at, ip="10.0.0.1", user_agent="ua-owner")
    stolen_at = rotated_at + timedelta(seconds=2)
    refresh(history, 1, stolen_at, ip="203.0.113.5", user_agent="ua-thief")
    refresh(history, 2, stolen_at + timedelta(seconds=1), ip="203.0.113.5", user_agent="ua-thief")
    reused_at = rotated_at + timedelta(minutes=5)
    decision = refresh(history, 2, reused_at, ip="10.0.0.1", user_agent="ua-owner")
    assert decision.outcome is Outcome.REUSE_DETECTED
    evidence = decision.events[0]
    assert isinstance(evidence, RefreshTokenReuseDetected)
    assert evidence.grace_retries == (
        {
            "generation": 1,
            "at": format_timestamp(stolen_at),
            "ip": "203.0.113.5",
            "user_agent": "ua-thief",
        },
    )
    assert evidence.first_use["ip"] == "203.0.113.5"  # generation 2 was first used by the thief


def test_hardening_5_same_client_grace_refuses_a_retry_from_another_user_agent() -> None:
    same_client = dataclasses.replace(POLICY, refresh_grace_same_client=True)
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at, user_agent="ua-owner", policy=same_client)
    retry = refresh(history, 1, rotated_at + US, user_agent="ua-owner", policy=same_client)
    assert retry.outcome is Outcome.GRACE_RETRY
    stolen = refresh(history, 1, rotated_at + 2 * US, user_agent="ua-thief", policy=same_client)
    assert stolen.outcome is Outcome.REUSE_DETECTED
    assert fold(history).end_reason == "reuse_detected"


def test_hardening_5_without_same_client_another_user_agent_gets_the_grace() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at, user_agent="ua-owner")
    assert refresh(history, 1, rotated_at + US, user_agent="ua-b").outcome is Outcome.GRACE_RETRY


def test_a_state_keeps_the_first_retries_and_the_latest() -> None:
    history = begin()
    rotated_at = T0 + timedelta(minutes=1)
    refresh(history, 1, rotated_at)
    for n in range(RETRIES_KEPT + 5):
        refresh(history, 1, rotated_at + (n + 1) * US, user_agent=f"ua-{n}")
    state = fold(history)
    retries = state.rotations[-1].retries
    assert len(retries) == RETRIES_KEPT
    agents = [r.user_agent for r in retries]
    assert agents == [*(f"ua-{n}" for n in range(RETRIES_KEPT - 1)), f"ua-{RETRIES_KEPT + 4}"]
    assert last_event_at(state) == rotated_at + (RETRIES_KEPT + 5) * US
    assert sum(isinstance(e, RefreshTokenRetried) for e in history) == RETRIES_KEPT + 5


def test_refresh_after_reuse_is_refused_as_ended_without_events() -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=1))
    refresh(history, 1, T0 + timedelta(minutes=2))
    assert refresh(history, 2, T0 + timedelta(minutes=3)) == Decision((), Outcome.ENDED)


@pytest.mark.parametrize("presented", [3, 4, 100, 0, -1])
def test_generation_above_current_or_below_one_is_unknown_without_events(presented: int) -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=1))
    assert refresh(history, presented, T0 + timedelta(minutes=2)) == Decision(
        (), Outcome.UNKNOWN_GENERATION
    )
    assert fold(history).generation == 2
    assert is_valid(fold(history), T0 + timedelta(minutes=2), POLICY)


# Expiry is recorded once, at the moment it happened


@pytest.mark.parametrize("decider", DECIDERS.values(), ids=DECIDERS.keys())
def test_decision_after_idle_timeout_records_idle_end_at_the_expiry_moment(
    decider: Decider,
) -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=1))
    refresh(history, 2, T0 + timedelta(minutes=10))
    last_activity = fold(history).last_activity
    assert last_activity == T0 + timedelta(minutes=10)
    decision = decider(fold(history), T0 + timedelta(hours=3), POLICY)
    assert decision == Decision(
        (SessionEnded(occurred_at=last_activity + IDLE, reason="idle_timeout"),),
        Outcome.IDLE_TIMEOUT,
    )


@pytest.mark.parametrize("decider", DECIDERS.values(), ids=DECIDERS.keys())
def test_decision_exactly_at_idle_limit_records_idle_timeout(decider: Decider) -> None:
    decision = decider(fold(begin()), T0 + IDLE, POLICY)
    assert decision == Decision(
        (SessionEnded(occurred_at=T0 + IDLE, reason="idle_timeout"),), Outcome.IDLE_TIMEOUT
    )


@pytest.mark.parametrize("decider", DECIDERS.values(), ids=DECIDERS.keys())
def test_absolute_end_before_idle_end_records_absolute_timeout(decider: Decider) -> None:
    history = begin()
    for minutes in range(30, 8 * 60, 30):
        activity(history, T0 + timedelta(minutes=minutes))
    # Idle end would be 8 h 30 min; the absolute end at 8 h comes first.
    decision = decider(fold(history), T0 + timedelta(hours=8, minutes=10), POLICY)
    assert decision == Decision(
        (SessionEnded(occurred_at=T0 + ABSOLUTE, reason="absolute_timeout"),),
        Outcome.ABSOLUTE_TIMEOUT,
    )


@pytest.mark.parametrize("decider", DECIDERS.values(), ids=DECIDERS.keys())
def test_second_decision_after_expiry_records_nothing(decider: Decider) -> None:
    history = begin()
    first = decide_refresh(
        fold(history),
        1,
        next_token_hash="h",
        ip=None,
        user_agent=None,
        now=T0 + timedelta(hours=2),
        policy=POLICY,
    )
    assert first.outcome is Outcome.IDLE_TIMEOUT
    history.extend(first.events)
    state = fold(history)
    assert state.ended_at == T0 + IDLE
    assert state.end_reason == "idle_timeout"
    assert decider(state, T0 + timedelta(hours=2, seconds=1), POLICY) == Decision((), Outcome.ENDED)


def test_expired_session_with_a_stale_token_records_expiry_not_reuse() -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=1))
    decision = refresh(history, 1, T0 + timedelta(hours=5))
    assert decision == Decision(
        (SessionEnded(occurred_at=T0 + timedelta(minutes=61), reason="idle_timeout"),),
        Outcome.IDLE_TIMEOUT,
    )


def test_refresh_not_counted_as_activity_lets_the_session_idle_out() -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=50), policy=NO_REFRESH_ACTIVITY)
    decision = refresh(history, 2, T0 + timedelta(minutes=70), policy=NO_REFRESH_ACTIVITY)
    assert decision == Decision(
        (SessionEnded(occurred_at=T0 + IDLE, reason="idle_timeout"),), Outcome.IDLE_TIMEOUT
    )


def test_decide_expiry_on_a_valid_session_records_nothing() -> None:
    assert decide_expiry(fold(begin()), T0 + IDLE - US, POLICY) == Decision((), Outcome.OK)


# Activity


def test_activity_on_valid_session_is_recorded_at_now() -> None:
    history = begin()
    now = T0 + timedelta(minutes=20)
    assert activity(history, now) == Decision((ActivityRecorded(occurred_at=now),), Outcome.OK)
    assert fold(history).last_activity == now


def test_activity_younger_than_debounce_is_not_recorded_but_is_ok() -> None:
    history = begin()
    activity(history, T0 + timedelta(minutes=20))
    assert activity(history, T0 + timedelta(minutes=20) + DEBOUNCE - US) == Decision((), Outcome.OK)
    assert fold(history).last_activity == T0 + timedelta(minutes=20)


def test_activity_exactly_at_debounce_is_recorded() -> None:
    now = T0 + DEBOUNCE
    assert activity(begin(), now) == Decision((ActivityRecorded(occurred_at=now),), Outcome.OK)


# End


def test_end_on_valid_session_records_the_reason_at_now() -> None:
    history = begin()
    now = T0 + timedelta(minutes=7)
    decision = decide_end(fold(history), "logout", now, POLICY)
    assert decision == Decision((SessionEnded(occurred_at=now, reason="logout"),), Outcome.OK)
    history.extend(decision.events)
    state = fold(history)
    assert (state.ended_at, state.end_reason) == (now, "logout")
    assert not is_valid(state, now, POLICY)


def test_end_on_ended_session_records_nothing() -> None:
    history = [*begin(), SessionEnded(occurred_at=T0 + timedelta(minutes=1), reason="logout")]
    decision = decide_end(fold(history), "logout", T0 + timedelta(minutes=2), POLICY)
    assert decision == Decision((), Outcome.ENDED)


# Replay and stream shape


def test_replay_of_decider_history_equals_folding_step_by_step() -> None:
    history = begin()
    refresh(history, 1, T0 + timedelta(minutes=2), ip="10.0.0.2", user_agent="ua-2")
    refresh(history, 1, T0 + timedelta(minutes=2, seconds=4))  # grace retry
    activity(history, T0 + timedelta(minutes=30))
    refresh(history, 2, T0 + timedelta(minutes=30, seconds=20))  # within debounce
    refresh(history, 3, T0 + timedelta(minutes=40), policy=NO_REFRESH_ACTIVITY)
    refresh(history, 2, T0 + timedelta(minutes=45), ip="192.0.2.1")  # reuse
    assert [type(e) for e in history] == [
        SessionStarted,
        RefreshTokenRotated,
        ActivityRecorded,
        RefreshTokenRetried,
        ActivityRecorded,
        RefreshTokenRotated,
        RefreshTokenRotated,
        RefreshTokenReuseDetected,
        SessionEnded,
    ]
    state: SessionState | None = None
    for event in history:
        state = evolve(state, SID, event)
    assert state is not None
    assert replay(SID, history) == state
    assert state.version == len(history)
    assert state.generation == 4
    assert [r.retired_generation for r in state.rotations] == [1, 2, 3]
    assert state.last_activity == T0 + timedelta(minutes=30)
    assert state.end_reason == "reuse_detected"


def test_replay_of_an_empty_stream_is_none() -> None:
    assert replay(SID, []) is None


@pytest.mark.parametrize(
    "first",
    [
        ActivityRecorded(occurred_at=T0),
        SessionEnded(occurred_at=T0, reason="logout"),
        RefreshTokenRotated(
            occurred_at=T0, generation=2, refresh_token_hash="h", ip=None, user_agent=None
        ),
    ],
    ids=lambda e: type(e).__name__,
)
def test_stream_not_beginning_with_session_started_is_rejected(first: Event) -> None:
    with pytest.raises(NotASessionStream):
        replay(SID, [first, *begin()])
    with pytest.raises(NotASessionStream):
        evolve(None, SID, first)


def test_stream_starting_twice_is_rejected() -> None:
    with pytest.raises(NotASessionStream):
        replay(SID, [*begin(), ActivityRecorded(occurred_at=T0 + DEBOUNCE), *begin(T0 + IDLE)])
    with pytest.raises(NotASessionStream):
        evolve(fold(begin()), SID, begin(T0 + timedelta(minutes=1))[0])


def test_only_the_latest_rotations_are_kept_and_older_reuse_is_still_caught() -> None:
    state = fold(begin())
    now = T0
    for _ in range(ROTATIONS_KEPT + 8):
        now += timedelta(seconds=30)
        decision = decide_refresh(
            state, state.generation, next_token_hash="h", ip=None, user_agent=None,
            now=now, policy=POLICY,
        )  # fmt: skip
        for event in decision.events:
            state = evolve(state, SID, event)
    assert len(state.rotations) == ROTATIONS_KEPT
    assert state.rotations[0].retired_generation == 9
    stale = decide_refresh(
        state, 2, next_token_hash="h", ip="203.0.113.9", user_agent=None,
        now=now + timedelta(minutes=1), policy=POLICY,
    )  # fmt: skip
    assert stale.outcome is Outcome.REUSE_DETECTED
    evidence = stale.events[0]
    assert isinstance(evidence, RefreshTokenReuseDetected)
    assert evidence.first_use == {"at": None, "ip": None, "user_agent": None}


# DPoP binding (RFC 9449 §5).


def _bound(jkt: str = "key-a") -> SessionState:
    return fold(
        [
            start(
                user="alice",
                client_id="web",
                scope=(),
                refresh_token_hash="hash-1",
                ip=None,
                user_agent=None,
                now=T0,
                jkt=jkt,
            )
        ]
    )


def test_a_session_started_with_a_proof_is_bound_to_its_key() -> None:
    assert _bound().jkt == "key-a"
    assert fold(begin()).jkt is None


@pytest.mark.parametrize(("state", "jkt"), [(_bound(), "key-a"), (fold(begin()), None)])
def test_the_bound_key_or_no_binding_lets_a_refresh_go_on(
    state: SessionState, jkt: str | None
) -> None:
    assert decide_dpop(state, jkt, ip=None, user_agent=None, now=T0, revoke=True) is None


@pytest.mark.parametrize(("jkt", "reason"), [(None, "missing"), ("key-b", "another_key")])
def test_any_other_key_is_refused_and_recorded_but_ends_nothing(
    jkt: str | None, reason: str
) -> None:
    decision = decide_dpop(_bound(), jkt, ip="192.0.2.9", user_agent="ua", now=T0, revoke=False)
    assert decision is not None
    assert decision.outcome is Outcome.DPOP_REFUSED
    assert not decision.is_granted
    (refused,) = decision.events
    assert refused == DpopProofRefused(
        occurred_at=T0, reason=reason, jkt=jkt, ip="192.0.2.9", user_agent="ua"
    )
    assert evolve(_bound(), SID, refused).ended_at is None


def test_with_revoke_a_mismatch_ends_the_session_too() -> None:
    decision = decide_dpop(_bound(), "key-b", ip=None, user_agent=None, now=T0, revoke=True)
    assert decision is not None
    assert [type(e) for e in decision.events] == [DpopProofRefused, SessionEnded]
    ended = fold([*begin(), *decision.events])
    assert ended.end_reason == "dpop_refused"
