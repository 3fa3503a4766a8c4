"""Point-in-time and what-if replays: the session fold applied to history up to a moment, or
to all of history under another policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ledger.events import Event, SessionEnded
from ledger.records import RecordedEvent
from projections import session
from projections.session import Outcome, Policy, SessionState, parse_duration
from projections.streams import is_session, session_id_of

EXPIRY_REASONS = (Outcome.IDLE_TIMEOUT.value, Outcome.ABSOLUTE_TIMEOUT.value)


@dataclass(frozen=True)
class PointInTime:
    """A session as it was at `as_of`."""

    session_id: str
    as_of: datetime
    state: SessionState | None
    status: str
    """"valid", "not_started", or why not: "idle_timeout" or "absolute_timeout" (recorded or
    not), or "ended" (by logout or reuse detection; `state.end_reason` says which)."""
    idle_for: timedelta | None

    @property
    def is_valid(self) -> bool:
        return self.status == "valid"


def as_of(
    session_id: str, events: Iterable[Event], moment: datetime, policy: Policy
) -> PointInTime:
    """Fold the session's events that had happened by `moment` and judge it at that moment."""
    state: SessionState | None = None
    for event in events:
        if event.occurred_at > moment:
            break
        state = session.evolve(state, session_id, event)
    if state is None:
        return PointInTime(session_id, moment, None, "not_started", None)
    return judge(state, moment, policy)


def judge(state: SessionState, moment: datetime, policy: Policy) -> PointInTime:
    """The session's status and idle time at `moment`, given its state by then. Idle time
    stops counting when the session ends: at its recorded end, or at the expiry it had
    reached by `moment` though none was recorded yet."""
    outcome = session.status(state, moment, policy)
    status = "valid" if outcome is Outcome.OK else outcome.value
    if outcome is Outcome.ENDED and state.end_reason in EXPIRY_REASONS:
        status = state.end_reason  # a recorded expiry reads the same as one not yet recorded
    end = state.ended_at
    if end is None and outcome is not Outcome.OK:
        end, _ = session.expiry(state, policy)
    frozen = moment if end is None else min(moment, end)
    return PointInTime(state.session_id, moment, state, status, session.idle_for(state, frozen))


@dataclass(frozen=True)
class Ending:
    """When and why a session ended (or will end, if nothing more happens) under a policy."""

    at: datetime
    reason: str


@dataclass
class _Simulation:
    state: SessionState
    actual: Ending | None = None
    what_if: Ending | None = None


@dataclass(frozen=True)
class Change:
    """A session that would have ended at another moment under the other policy."""

    session_id: str
    user: str
    actual: Ending
    what_if: Ending

    @property
    def ends_earlier(self) -> bool:
        """Whether the other policy would have ended the session sooner."""
        return self.what_if.at < self.actual.at


@dataclass(frozen=True)
class WhatIf:
    """How history would have gone under another policy."""

    sessions: int
    earlier: list[Change]
    later: list[Change]


def what_if(
    events: Iterable[RecordedEvent],
    current: Policy,
    other: Policy,
    *,
    since: datetime | None = None,
) -> WhatIf:
    """Replay session streams under both policies and compare when each session ended.

    Recorded expiries are consequences of the current policy, not of the user, so both replays
    skip them and derive expiries from their own policy; logouts and reuse revocations stand.
    """
    sims: dict[str, _Simulation] = {}
    before_since: set[str] = set()
    for recorded in events:
        if not is_session(recorded) or recorded.stream_id in before_since:
            continue
        event = recorded.event
        sim = sims.get(recorded.stream_id)
        if sim is None:
            if since is not None and event.occurred_at < since:
                before_since.add(recorded.stream_id)
                continue
            session_id = session_id_of(recorded.stream_id)
            sims[recorded.stream_id] = _Simulation(session.evolve(None, session_id, event))
            continue
        _step(sim, event, current, other)
    changes = [c for sim in sims.values() if (c := _change(sim, current, other)) is not None]
    return WhatIf(
        len(sims),
        [c for c in changes if c.ends_earlier],
        [c for c in changes if not c.ends_earlier],
    )


def _step(sim: _Simulation, event: Event, current: Policy, other: Policy) -> None:
    at = event.occurred_at
    sim.actual = sim.actual or _expired_by(sim.state, at, current)
    sim.what_if = sim.what_if or _expired_by(sim.state, at, other)
    if isinstance(event, SessionEnded):
        if event.reason not in EXPIRY_REASONS:
            ended = Ending(at, event.reason)
            sim.actual, sim.what_if = sim.actual or ended, sim.what_if or ended
        return
    sim.state = session.evolve(sim.state, sim.state.session_id, event)


def _expired_by(state: SessionState, at: datetime, policy: Policy) -> Ending | None:
    ending = _open_ending(state, policy)
    return ending if ending.at <= at else None


def _change(sim: _Simulation, current: Policy, other: Policy) -> Change | None:
    actual = sim.actual or _open_ending(sim.state, current)
    what_if_end = sim.what_if or _open_ending(sim.state, other)
    if actual.at == what_if_end.at:
        return None  # the same moment, even if for another reason, is no change
    return Change(sim.state.session_id, sim.state.user, actual, what_if_end)


def _open_ending(state: SessionState, policy: Policy) -> Ending:
    ends, reason = session.expiry(state, policy)
    return Ending(ends, reason.value)


def parse_policy_changes(text: str, base: Policy) -> Policy:
    """`idle=30m,absolute=4h` (also access, grace, debounce) applied to `base`."""
    names = {
        "idle": "idle_timeout",
        "absolute": "absolute_timeout",
        "access": "access_token_ttl",
        "grace": "refresh_grace",
        "debounce": "activity_debounce",
    }
    changes: dict[str, timedelta] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, value = part.partition("=")
        if not equals or name.strip() not in names:
            raise ValueError(
                f"{part!r}: expected NAME=DURATION with NAME one of {', '.join(names)}"
            )
        changes[names[name.strip()]] = parse_duration(value)
    if not changes:
        raise ValueError("no policy change given (e.g. idle=30m,absolute=4h)")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
