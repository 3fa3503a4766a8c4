"""Principal state: failed logins and lockouts of one user name, or failed authentications and
lockouts of one client id, folded from its stream. Both follow the same rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ledger.events import (
    ClientAuthenticationFailed,
    ClientLocked,
    Event,
    LoginFailed,
    PrincipalLocked,
    PrincipalUnlocked,
)

LOCKED = "locked"
"""The failure reason of an attempt refused because of a lock; it does not count as a failure."""

MAX_TRACKED_FAILURES = 32
"""The fold keeps this many recent failures; LockoutPolicy.max_failures may not exceed it."""


@dataclass(frozen=True, kw_only=True)
class LockoutPolicy:
    """After `max_failures` failures within `window`, the principal is locked until the window
    that began with the oldest of them closes."""

    max_failures: int = 5
    window: timedelta = timedelta(minutes=15)


@dataclass(frozen=True, kw_only=True)
class PrincipalState:
    """Recent counted failures (oldest first) and the current lock, if any."""

    name: str
    version: int = 0
    recent_failures: tuple[datetime, ...] = ()
    locked_until: datetime | None = None


def evolve(state: PrincipalState, event: Event) -> PrincipalState:
    """Fold one event of the principal's stream."""
    state = dataclasses.replace(state, version=state.version + 1)
    if isinstance(event, LoginFailed | ClientAuthenticationFailed) and event.reason != LOCKED:
        recent = (*state.recent_failures, event.occurred_at)[-MAX_TRACKED_FAILURES:]
        return dataclasses.replace(state, recent_failures=recent)
    if isinstance(event, PrincipalLocked | ClientLocked):
        return dataclasses.replace(state, locked_until=event.until, recent_failures=())
    if isinstance(event, PrincipalUnlocked):
        return dataclasses.replace(state, locked_until=None, recent_failures=())
    return state


def replay(name: str, events: Iterable[Event]) -> PrincipalState:
    """Fold a whole principal stream."""
    state = PrincipalState(name=name)
    for event in events:
        state = evolve(state, event)
    return state


def is_locked(state: PrincipalState, now: datetime) -> bool:
    """Whether logins (or the client's authentications) are refused at `now`."""
    return state.locked_until is not None and now < state.locked_until


def decide_failure(
    state: PrincipalState,
    reason: str,
    *,
    ip: str | None,
    user_agent: str | None,
    now: datetime,
    policy: LockoutPolicy,
    client: bool = False,
) -> tuple[Event, ...]:
    """Record a failed attempt, and the lock when it is one failure too many; `client` records
    a client's failed authentication instead of a failed login."""
    if is_locked(state, now):
        reason = LOCKED
    failure = ClientAuthenticationFailed if client else LoginFailed
    failed = failure(occurred_at=now, reason=reason, ip=ip, user_agent=user_agent)
    if reason == LOCKED:
        return (failed,)
    in_window = [t for t in (*state.recent_failures, now) if now - t < policy.window]
    if len(in_window) < policy.max_failures:
        return (failed,)
    oldest = in_window[-policy.max_failures]
    lock = ClientLocked if client else PrincipalLocked
    locked = lock(occurred_at=now, until=oldest + policy.window, failures=len(in_window))
    return (failed, locked)
