"""The session deciders against a small reference model of the session rules, written apart.

Random runs of refreshes (current, previous in and out of grace, stale, unknown), activity, logout,
expiry checks and forward clock jumps. After every step the decider's events are folded with
`evolve` and the outcome, the events, validity, generation and the history's shape are compared
with what the model says the rules require.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger.events import (
    ActivityRecorded,
    Event,
    RefreshTokenRetried,
    RefreshTokenReuseDetected,
    RefreshTokenRotated,
    SessionEnded,
)
from ledger.serialization import format_timestamp
from projections.session import (
    RETRIES_KEPT,
    ROTATIONS_KEPT,
    Decision,
    Outcome,
    Policy,
    SessionState,
    decide_activity,
    decide_end,
    decide_expiry,
    decide_refresh,
    evolve,
    is_valid,
    replay,
    start,
)

SID = "session-model"
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
POLICY = Policy(
    idle_timeout=timedelta(minutes=30),
    absolute_timeout=timedelta(hours=2),
    refresh_grace=timedelta(seconds=10),
    activity_debounce=timedelta(seconds=60),
)
SETTINGS = settings(max_examples=200, stateful_step_count=30, deadline=None)

_seconds = [timedelta(seconds=s) for s in (0, 1, 5, 9, 10, 11, 30, 59, 60, 61)]
small_jumps = st.one_of(
    st.sampled_from([*_seconds, US, timedelta(seconds=10) - US, timedelta(seconds=10) + US]),
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(minutes=2)),
)
_minutes = [timedelta(minutes=m) for m in (5, 10, 29, 30, 31, 45, 60, 90, 120, 180)]
large_jumps = st.one_of(
    st.sampled_from([*_minutes, timedelta(minutes=30) - US]),
    st.timedeltas(min_value=timedelta(minutes=2), max_value=timedelta(minutes=30)),
    st.timedeltas(min_value=timedelta(minutes=2), max_value=timedelta(hours=3)),
)
active_gaps = st.one_of(
    st.sampled_from([timedelta(minutes=29), timedelta(minutes=30) - US]),
    st.timedeltas(min_value=timedelta(minutes=1), max_value=timedelta(minutes=30) - US),
)
nudges = st.sampled_from([-US, timedelta(0), US])
ips = st.sampled_from(["10.0.0.1", "10.0.0.2", "192.0.2.66", None])
user_agents = st.sampled_from(["ua-phone", "ua-laptop", None])

Expected = tuple[Outcome, tuple[Event, ...]]


class SessionModel(RuleBasedStateMachine):
    """Drives the real deciders and a plain-variable reference model side by side."""

    policy: ClassVar[Policy] = POLICY

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.begin()

    def begin(self) -> None:
        """Start a session at `now`: the real history and state, and the model beside them."""
        first = start(
            user="alice",
            client_id="web",
            scope=("openid",),
            refresh_token_hash="hash-1",
            ip="10.0.0.1",
            user_agent="ua-login",
            now=self.now,
        )
        self.history: list[Event] = [first]
        self.state: SessionState = evolve(None, SID, first)
        # The reference model: nothing here comes from the code under test.
        self.started_at = self.now
        self.generation = 1
        self.last_activity = self.now
        self.retired: dict[int, tuple[datetime, str | None, str | None]] = {}
        self.retries: dict[int, list[tuple[datetime, str | None, str | None]]] = {}
        self.ended = False
        self.why: str | None = None

    # What the rules say

    def model_is_valid(self) -> bool:
        return (
            not self.ended
            and self.now - self.last_activity < self.policy.idle_timeout
            and self.now < self.started_at + self.policy.absolute_timeout
        )

    def model_refusal(self) -> Expected | None:
        if self.ended:
            return Outcome.ENDED, ()
        if self.model_is_valid():
            return None
        idle_end = self.last_activity + self.policy.idle_timeout
        absolute_end = self.started_at + self.policy.absolute_timeout
        # "Whichever is earlier"; at a tie the absolute lifetime, the hard cap, names the end.
        if absolute_end <= idle_end:
            return Outcome.ABSOLUTE_TIMEOUT, (
                SessionEnded(occurred_at=absolute_end, reason="absolute_timeout"),
            )
        return Outcome.IDLE_TIMEOUT, (SessionEnded(occurred_at=idle_end, reason="idle_timeout"),)

    def model_activity(self) -> tuple[Event, ...]:
        if self.now - self.last_activity < self.policy.activity_debounce:
            return ()
        return (ActivityRecorded(occurred_at=self.now),)

    def model_refresh(self, presented: int, ip: str | None, user_agent: str | None) -> Expected:
        refused = self.model_refusal()
        if refused is not None:
            return refused
        if presented == self.generation:
            rotated = RefreshTokenRotated(
                occurred_at=self.now,
                generation=self.generation + 1,
                refresh_token_hash=self.next_hash(),
                ip=ip,
                user_agent=user_agent,
            )
            touched = self.model_activity() if self.policy.refresh_counts_as_activity else ()
            return Outcome.OK, (rotated, *touched)
        if presented > self.generation or presented < 1:
            return Outcome.UNKNOWN_GENERATION, ()
        first_at, first_ip, first_user_agent = self.retired[presented]
        previous = presented == self.generation - 1
        same_client = not self.policy.refresh_grace_same_client or user_agent == first_user_agent
        if previous and self.now - first_at <= self.policy.refresh_grace and same_client:
            retried = RefreshTokenRetried(
                occurred_at=self.now, generation=presented, ip=ip, user_agent=user_agent
            )
            return Outcome.GRACE_RETRY, (retried,)
        # The evidence keeps the retries of the rotations a state keeps.
        kept = sorted(self.retired)[-ROTATIONS_KEPT:]
        evidence = RefreshTokenReuseDetected(
            occurred_at=self.now,
            presented_generation=presented,
            current_generation=self.generation,
            first_use={
                "at": format_timestamp(first_at),
                "ip": first_ip,
                "user_agent": first_user_agent,
            },
            grace_retries=tuple(
                {"generation": g, "at": format_timestamp(at), "ip": where, "user_agent": agent}
                for g in kept
                for at, where, agent in self.retries.get(g, [])
            ),
            reuse={"at": format_timestamp(self.now), "ip": ip, "user_agent": user_agent},
        )
        ended = SessionEnded(occurred_at=self.now, reason="reuse_detected")
        return Outcome.REUSE_DETECTED, (evidence, ended)

    def model_take(self, events: tuple[Event, ...]) -> None:
        for event in events:
            if isinstance(event, RefreshTokenRotated):
                self.retired[self.generation] = (self.now, event.ip, event.user_agent)
                self.generation += 1
            elif isinstance(event, RefreshTokenRetried):
                retries = self.retries.setdefault(event.generation, [])
                retries.append((self.now, event.ip, event.user_agent))
                if len(retries) > RETRIES_KEPT:  # the first ones and the latest
                    del retries[RETRIES_KEPT - 1]
            elif isinstance(event, ActivityRecorded):
                self.last_activity = self.now
            elif isinstance(event, SessionEnded):
                self.ended, self.why = True, event.reason

    def next_hash(self) -> str:
        return f"hash-{self.generation + 1}"

    # Driving both

    def check_and_fold(self, decision: Decision, expected: Expected) -> None:
        outcome, events = expected
        assert decision.outcome is outcome
        assert [type(e) for e in decision.events] == [type(e) for e in events]
        assert decision.events == events
        for event in decision.events:
            self.state = evolve(self.state, SID, event)
            self.history.append(event)
        self.model_take(events)

    def refresh(self, presented: int, ip: str | None, user_agent: str | None) -> None:
        expected = self.model_refresh(presented, ip, user_agent)
        decision = decide_refresh(
            self.state,
            presented,
            next_token_hash=self.next_hash(),
            ip=ip,
            user_agent=user_agent,
            now=self.now,
            policy=self.policy,
        )
        self.check_and_fold(decision, expected)

    def record_activity(self) -> None:
        refused = self.model_refusal()
        expected = refused if refused is not None else (Outcome.OK, self.model_activity())
        self.check_and_fold(decide_activity(self.state, self.now, self.policy), expected)

    def rotated_at(self) -> datetime:
        """When the current generation replaced the previous one."""
        return self.retired[self.generation - 1][0]

    # Clock: forwards only

    @rule(delta=small_jumps)
    def small_clock_jump(self, delta: timedelta) -> None:
        self.now += delta

    @rule(delta=large_jumps)
    def large_clock_jump(self, delta: timedelta) -> None:
        self.now += delta

    @rule(limit=st.sampled_from(["idle", "absolute", "debounce"]), nudge=nudges)
    def clock_jump_to_a_limit(self, limit: str, nudge: timedelta) -> None:
        """Land on a rule's boundary or a microsecond either side, unless that is in the past."""
        moments = {
            "idle": self.last_activity + self.policy.idle_timeout,
            "absolute": self.started_at + self.policy.absolute_timeout,
            "debounce": self.last_activity + self.policy.activity_debounce,
        }
        self.now = max(self.now, moments[limit] + nudge)

    # Refresh

    @precondition(lambda self: not self.ended)
    @rule(ip=ips, user_agent=user_agents)
    def refresh_with_current_token(self, ip: str | None, user_agent: str | None) -> None:
        self.refresh(self.generation, ip, user_agent)

    @precondition(lambda self: not self.ended and self.generation >= 2)
    @rule(ip=ips, user_agent=user_agents)
    def refresh_with_previous_token(self, ip: str | None, user_agent: str | None) -> None:
        self.refresh(self.generation - 1, ip, user_agent)

    @precondition(lambda self: not self.ended and self.generation >= 2)
    @rule(nudge=nudges, ip=ips, user_agent=user_agents)
    def refresh_with_previous_token_at_grace_edge(
        self, nudge: timedelta, ip: str | None, user_agent: str | None
    ) -> None:
        self.now = max(self.now, self.rotated_at() + self.policy.refresh_grace + nudge)
        self.refresh(self.generation - 1, ip, user_agent)

    @precondition(lambda self: not self.ended and self.generation >= 3)
    @rule(back=st.integers(min_value=2, max_value=6), ip=ips, user_agent=user_agents)
    def refresh_with_stale_token(self, back: int, ip: str | None, user_agent: str | None) -> None:
        self.refresh(max(1, self.generation - back), ip, user_agent)

    @rule(offset=st.integers(min_value=-3, max_value=8), ip=ips)
    def refresh_with_any_generation(self, offset: int, ip: str | None) -> None:
        self.refresh(self.generation + offset, ip, None)

    # Activity, logout, expiry

    @precondition(lambda self: not self.ended)
    @rule()
    def activity(self) -> None:
        self.record_activity()

    @precondition(lambda self: not self.ended)
    @rule(gaps=st.lists(active_gaps, min_size=1, max_size=6), by_refresh=st.booleans())
    def stay_active(self, gaps: list[timedelta], by_refresh: bool) -> None:
        """A user at work: activity (or refreshes) at gaps below the idle timeout, for hours."""
        for gap in gaps:
            self.now += gap
            if by_refresh:
                self.refresh(self.generation, "10.0.0.1", "ua-laptop")
            else:
                self.record_activity()

    @precondition(lambda self: not self.ended)
    @rule()
    def logout(self) -> None:
        refused = self.model_refusal()
        logged_out = (SessionEnded(occurred_at=self.now, reason="logout"),)
        expected = refused if refused is not None else (Outcome.OK, logged_out)
        self.check_and_fold(decide_end(self.state, "logout", self.now, self.policy), expected)

    @rule()
    def expiry_check(self) -> None:
        refused = self.model_refusal()
        expected = refused if refused is not None else (Outcome.OK, ())
        self.check_and_fold(decide_expiry(self.state, self.now, self.policy), expected)

    @precondition(lambda self: self.ended)
    @rule()
    def start_another_session(self) -> None:
        self.begin()

    @invariant()
    def validity_matches_the_model(self) -> None:
        assert is_valid(self.state, self.now, self.policy) == self.model_is_valid()

    @invariant()
    def folded_state_matches_the_model(self) -> None:
        assert self.state.generation == self.generation
        assert self.state.last_activity == self.last_activity
        assert (self.state.ended_at is not None) == self.ended
        assert self.state.end_reason == self.why

    @invariant()
    def history_ends_at_most_once_and_nothing_follows_the_end(self) -> None:
        ends = [i for i, e in enumerate(self.history) if isinstance(e, SessionEnded)]
        assert len(ends) <= 1
        if ends:
            assert ends[0] == len(self.history) - 1

    @invariant()
    def replay_equals_the_incremental_fold(self) -> None:
        assert replay(SID, self.history) == self.state
        assert self.state.version == len(self.history)


class SessionModelRefreshIsNotActivity(SessionModel):
    """The same rules when a refresh does not count as activity."""

    policy = dataclasses.replace(POLICY, refresh_counts_as_activity=False)


class SessionModelSameClientGrace(SessionModel):
    """The same rules when only the first use's user agent gets the grace."""

    policy = dataclasses.replace(POLICY, refresh_grace_same_client=True)


@pytest.mark.parametrize(
    "machine", [SessionModel, SessionModelRefreshIsNotActivity, SessionModelSameClientGrace]
)
def test_session_deciders_follow_the_reference_model(machine: type[SessionModel]) -> None:
    run_state_machine_as_test(machine, settings=SETTINGS)
