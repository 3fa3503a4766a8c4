"""Session state: the pure fold of a session stream, its validity rules and the deciders.

`evolve(state, event)` is the one fold every reader uses (live decisions, the inline projection,
rebuilds, point-in-time replay). Deciders take the state, a command, `now` and the policy and return
the events to append with the outcome; they never read a clock or touch storage.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
from ledger.serialization import JsonValue, format_timestamp


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The session rules; DESIGN.md gives the defaults and where they come from."""

    access_token_ttl: timedelta = timedelta(minutes=15)
    idle_timeout: timedelta = timedelta(minutes=60)
    absolute_timeout: timedelta = timedelta(hours=8)
    refresh_grace: timedelta = timedelta(seconds=10)
    activity_debounce: timedelta = timedelta(seconds=60)
    refresh_counts_as_activity: bool = True
    refresh_grace_same_client: bool = False
    """Grant the grace only to a retry with the first use's user agent; any other is reuse."""


def parse_duration(text: str) -> timedelta:
    """Seconds (`90`) or a number with a unit: `90s`, `15m`, `8h`, `2d`."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use seconds or 90s, 15m, 8h, 2d)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


_DURATION = re.compile(r"(\d{1,9})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


ROTATIONS_KEPT = 32
"""The most recent rotations a state keeps as reuse evidence, so a session that refreshes in a
loop does not grow without bound. Reuse of an older generation is still detected."""


RETRIES_KEPT = 16
"""The grace retries of a retired token that a state keeps as reuse evidence: the first ones and
the latest (whose time last_event_at needs). The event log holds every one."""


@dataclass(frozen=True)
class Retry:
    """The retired token presented again within the grace window: when, and from where."""

    at: datetime
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True)
class Rotation:
    """One refresh: the generation it retired, when, from where, and its retries in grace."""

    retired_generation: int
    at: datetime
    ip: str | None
    user_agent: str | None
    retries: tuple[Retry, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SessionState:
    """What a session's events add up to."""

    session_id: str
    version: int
    user: str
    client_id: str
    scope: tuple[str, ...]
    started_at: datetime
    last_activity: datetime
    generation: int
    rotations: tuple[Rotation, ...] = ()
    ip: str | None = None
    user_agent: str | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    jkt: str | None = None
    """The thumbprint of the DPoP key the session is bound to (RFC 9449), if it is bound."""


class Outcome(enum.Enum):
    """How a decision went; anything but OK and GRACE_RETRY refuses the request."""

    OK = "ok"
    GRACE_RETRY = "grace_retry"  # the previous token again, in the grace window: same successor
    ENDED = "ended"
    IDLE_TIMEOUT = "idle_timeout"
    ABSOLUTE_TIMEOUT = "absolute_timeout"
    REUSE_DETECTED = "reuse_detected"
    UNKNOWN_GENERATION = "unknown_generation"
    DPOP_REFUSED = "dpop_refused"  # a bound session's refresh without its key's proof


@dataclass(frozen=True)
class Decision:
    """Events to append (possibly none) and the outcome for the caller."""

    events: tuple[Event, ...]
    outcome: Outcome

    @property
    def is_granted(self) -> bool:
        return self.outcome in (Outcome.OK, Outcome.GRACE_RETRY)


class SessionError(Exception):
    """Base of errors in session rules."""


class NotASessionStream(SessionError):
    """A stream's first event is not SessionStarted, or a SessionStarted comes later."""


def evolve(state: SessionState | None, session_id: str, event: Event) -> SessionState:
    """Fold one event into the session's state (None before its first event)."""
    if state is None:
        if not isinstance(event, SessionStarted):
            raise NotASessionStream(f"session {session_id} begins with {type(event).__name__}")
        return SessionState(
            session_id=session_id,
            version=1,
            user=event.user,
            client_id=event.client_id,
            scope=event.scope,
            started_at=event.occurred_at,
            last_activity=event.occurred_at,
            generation=1,
            ip=event.ip,
            user_agent=event.user_agent,
            jkt=event.jkt,
        )
    version = state.version + 1
    match event:
        case ActivityRecorded():
            return _with(state, version=version, last_activity=event.occurred_at)
        case RefreshTokenRotated():
            rotation = Rotation(event.generation - 1, event.occurred_at, event.ip, event.user_agent)
            return _with(
                state,
                version=version,
                generation=event.generation,
                rotations=(*state.rotations, rotation)[-ROTATIONS_KEPT:],
            )
        case RefreshTokenRetried():
            return _with(state, version=version, rotations=_retried(state.rotations, event))
        case SessionEnded():
            return _with(
                state, version=version, ended_at=event.occurred_at, end_reason=event.reason
            )
        case SessionStarted():
            raise NotASessionStream(f"session {session_id} starts twice")
        case _:
            # Evidence such as RefreshTokenReuseDetected changes nothing but the version.
            return _with(state, version=version)


def _retried(rotations: tuple[Rotation, ...], event: RefreshTokenRetried) -> tuple[Rotation, ...]:
    """The rotations with the retry added to the latest, the one that retired the presented
    token (decide_refresh grants the grace to the previous generation only)."""
    if not rotations or rotations[-1].retired_generation != event.generation:
        return rotations
    latest = rotations[-1]
    kept = latest.retries[: RETRIES_KEPT - 1]
    retry = Retry(event.occurred_at, event.ip, event.user_agent)
    return (*rotations[:-1], dataclasses.replace(latest, retries=(*kept, retry)))


def _with(state: SessionState, **changes: Any) -> SessionState:
    """dataclasses.replace for the fold's hot path: a rebuild calls it for every event, and this
    copies the fields instead of re-running the constructor (SessionState has no __post_init__)."""
    changed = object.__new__(SessionState)
    changed.__dict__.update(state.__dict__)
    changed.__dict__.update(changes)
    return changed


def replay(session_id: str, events: Iterable[Event]) -> SessionState | None:
    """Fold a whole stream; None when it has no events."""
    state: SessionState | None = None
    for event in events:
        state = evolve(state, session_id, event)
    return state


def expiry(state: SessionState, policy: Policy) -> tuple[datetime, Outcome]:
    """When the session stops being valid if nothing else happens, and why."""
    idle_end = idle_end_of(state, policy)
    absolute_end = absolute_end_of(state, policy)
    if idle_end < absolute_end:
        return idle_end, Outcome.IDLE_TIMEOUT
    return absolute_end, Outcome.ABSOLUTE_TIMEOUT


def idle_end_of(state: SessionState, policy: Policy) -> datetime:
    """The moment the session ends unless there is activity before."""
    return state.last_activity + policy.idle_timeout


def absolute_end_of(state: SessionState, policy: Policy) -> datetime:
    """The moment the session ends whatever happens."""
    return state.started_at + policy.absolute_timeout


def valid_after(now: datetime, policy: Policy) -> tuple[datetime, datetime]:
    """is_valid as bounds a query can use: a session that has not ended is valid at `now` when
    its last activity is later than the first bound and its start later than the second."""
    return now - policy.idle_timeout, now - policy.absolute_timeout


def status(state: SessionState, now: datetime, policy: Policy) -> Outcome:
    """OK when the session is valid at `now`; otherwise why not."""
    if state.ended_at is not None:
        return Outcome.ENDED
    ends, reason = expiry(state, policy)
    return reason if now >= ends else Outcome.OK


def is_valid(state: SessionState, now: datetime, policy: Policy) -> bool:
    """DESIGN.md: started, not ended, idle below the limit, before the absolute end."""
    return status(state, now, policy) is Outcome.OK


def last_event_at(state: SessionState) -> datetime:
    """When the latest event folded into the state happened."""
    latest = max(state.started_at, state.last_activity)
    if state.rotations:
        rotation = state.rotations[-1]
        latest = max(latest, rotation.retries[-1].at if rotation.retries else rotation.at)
    return latest if state.ended_at is None else max(latest, state.ended_at)


def idle_for(state: SessionState, now: datetime) -> timedelta:
    """Time since the last activity (a refresh counts when the policy says so)."""
    return max(now - state.last_activity, timedelta(0))


def start(
    *,
    user: str,
    client_id: str,
    scope: tuple[str, ...],
    refresh_token_hash: str,
    ip: str | None,
    user_agent: str | None,
    now: datetime,
    jkt: str | None = None,
) -> SessionStarted:
    """The event that begins a session (bound to the DPoP key `jkt`, when given)."""
    return SessionStarted(
        occurred_at=now,
        user=user,
        client_id=client_id,
        scope=scope,
        refresh_token_hash=refresh_token_hash,
        ip=ip,
        user_agent=user_agent,
        jkt=jkt,
    )


def decide_dpop(
    state: SessionState,
    jkt: str | None,
    *,
    ip: str | None,
    user_agent: str | None,
    now: datetime,
    revoke: bool,
) -> Decision | None:
    """None when a refresh may go on: the session is bound to no key, or `jkt` (the presented
    proof's key) is its key. Else the refusal, recorded (RFC 9449 §5), and with `revoke` the
    session's end too; by default it goes on, so that whoever cannot use a stolen token cannot
    log its owner out either."""
    if state.jkt is None or jkt == state.jkt:
        return None
    refused = DpopProofRefused(
        occurred_at=now,
        reason="missing" if jkt is None else "another_key",
        jkt=jkt,
        ip=ip,
        user_agent=user_agent,
    )
    if revoke and state.ended_at is None:
        ended = SessionEnded(occurred_at=now, reason=Outcome.DPOP_REFUSED.value)
        return Decision((refused, ended), Outcome.DPOP_REFUSED)
    return Decision((refused,), Outcome.DPOP_REFUSED)


def decide_refresh(
    state: SessionState,
    presented_generation: int,
    *,
    next_token_hash: str,
    ip: str | None,
    user_agent: str | None,
    now: datetime,
    policy: Policy,
) -> Decision:
    """Rotate on the current token; repeat on a retry in grace; revoke on any other reuse."""
    refused = _refuse_if_invalid(state, now, policy)
    if refused is not None:
        return refused
    if presented_generation == state.generation:
        rotated = RefreshTokenRotated(
            occurred_at=now,
            generation=state.generation + 1,
            refresh_token_hash=next_token_hash,
            ip=ip,
            user_agent=user_agent,
        )
        touched = _activity(state, now, policy) if policy.refresh_counts_as_activity else ()
        return Decision((rotated, *touched), Outcome.OK)
    if presented_generation > state.generation or presented_generation < 1:
        return Decision((), Outcome.UNKNOWN_GENERATION)
    first_use = _rotation_of(state, presented_generation)
    in_grace = (
        first_use is not None
        and presented_generation == state.generation - 1
        and now - first_use.at <= policy.refresh_grace
        and (not policy.refresh_grace_same_client or user_agent == first_use.user_agent)
    )
    if in_grace:
        retried = RefreshTokenRetried(
            occurred_at=now, generation=presented_generation, ip=ip, user_agent=user_agent
        )
        return Decision((retried,), Outcome.GRACE_RETRY)
    evidence = RefreshTokenReuseDetected(
        occurred_at=now,
        presented_generation=presented_generation,
        current_generation=state.generation,
        first_use=_first_use(first_use),
        grace_retries=tuple(
            {"generation": rotation.retired_generation, **_request(r.at, r.ip, r.user_agent)}
            for rotation in state.rotations
            for r in rotation.retries
        ),
        reuse=_request(now, ip, user_agent),
    )
    ended = SessionEnded(occurred_at=now, reason=Outcome.REUSE_DETECTED.value)
    return Decision((evidence, ended), Outcome.REUSE_DETECTED)


def decide_activity(state: SessionState, now: datetime, policy: Policy) -> Decision:
    """Record activity at most once per debounce interval while the session is valid."""
    refused = _refuse_if_invalid(state, now, policy)
    if refused is not None:
        return refused
    return Decision(_activity(state, now, policy), Outcome.OK)


def decide_end(state: SessionState, reason: str, now: datetime, policy: Policy) -> Decision:
    """End the session; one that already ended or expired only has its expiry recorded."""
    refused = _refuse_if_invalid(state, now, policy)
    if refused is not None:
        return refused
    return Decision((SessionEnded(occurred_at=now, reason=reason),), Outcome.OK)


def decide_expiry(state: SessionState, now: datetime, policy: Policy) -> Decision:
    """Record an expiry that has passed and is not recorded yet (the session's end, once)."""
    refused = _refuse_if_invalid(state, now, policy)
    return refused if refused is not None else Decision((), Outcome.OK)


def _refuse_if_invalid(state: SessionState, now: datetime, policy: Policy) -> Decision | None:
    outcome = status(state, now, policy)
    if outcome is Outcome.OK:
        return None
    if outcome is Outcome.ENDED:
        return Decision((), outcome)
    # Recorded once, at the moment it happened, so replays and audits see the true end.
    ended_at, _ = expiry(state, policy)
    return Decision((SessionEnded(occurred_at=ended_at, reason=outcome.value),), outcome)


def _activity(state: SessionState, now: datetime, policy: Policy) -> tuple[Event, ...]:
    if now - state.last_activity < policy.activity_debounce:
        return ()
    return (ActivityRecorded(occurred_at=now),)


def _rotation_of(state: SessionState, retired_generation: int) -> Rotation | None:
    for rotation in state.rotations:
        if rotation.retired_generation == retired_generation:
            return rotation
    return None  # older than the rotations a state keeps


def _first_use(rotation: Rotation | None) -> dict[str, JsonValue]:
    if rotation is None:
        return {"at": None, "ip": None, "user_agent": None}
    return _request(rotation.at, rotation.ip, rotation.user_agent)


def _request(at: datetime, ip: str | None, user_agent: str | None) -> dict[str, JsonValue]:
    return {"at": format_timestamp(at), "ip": ip, "user_agent": user_agent}
