"""The summaries for security teams and analysts, as pure folds: user summary, hourly statistics
and alerts.

Each fold takes a row and one event (in the gap-safe order) and returns the new row. Facts an
event does not carry itself (whose session ended, when it began) come from the session's origin:
its first event, which never changes. `projections.sql.summaries` loads the rows a batch touches,
runs these folds and writes the rows back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger.events import (
    AuthorizationCodeReplayed,
    DpopProofRefused,
    LoginFailed,
    PrincipalLocked,
    RefreshTokenReuseDetected,
    RefreshTokenRotated,
    SessionEnded,
    SessionStarted,
)
from ledger.records import RecordedEvent
from ledger.serialization import JsonValue, format_timestamp
from projections.streams import is_principal, is_session, principal_name_of, session_id_of

BURST_FAILURES = 10
"""Failed logins from one address within BURST_WINDOW that raise a failure_burst alert."""
BURST_WINDOW = timedelta(minutes=10)


@dataclass(frozen=True)
class SessionOrigin:
    """Who a session belongs to and when it began (from its SessionStarted)."""

    user: str
    started_at: datetime

    @classmethod
    def of(cls, first: RecordedEvent) -> SessionOrigin:
        """The origin recorded by a session's first event."""
        return cls(first.event.user, first.occurred_at)  # type: ignore[attr-defined]


def origins_in(
    events: Sequence[RecordedEvent], needed: Collection[str]
) -> tuple[dict[str, SessionOrigin], set[str]]:
    """The origin of every session the batch starts; and the streams whose origin must be looked
    up: those the batch holds an event of a `needed` type for but does not start (most events
    are activity and rotations, which need none)."""
    origins: dict[str, SessionOrigin] = {}
    missing: set[str] = set()
    for recorded in events:
        if not is_session(recorded):
            continue
        if recorded.type == SessionStarted.type_name:
            origins[recorded.stream_id] = SessionOrigin.of(recorded)
        elif recorded.type in needed:
            missing.add(recorded.stream_id)
    return origins, missing - origins.keys()


# -- user summary ---------------------------------------------------------------------------------

USER_SUMMARY_NEEDS = (SessionEnded.type_name,)
"""The event types whose session origin the user summary needs."""


@dataclass(frozen=True)
class UserSummary:
    user_name: str
    sessions_started: int = 0
    open_sessions: int = 0
    last_login: datetime | None = None
    failures: int = 0
    last_failure: datetime | None = None
    locked_until: datetime | None = None


def by_user(
    events: Iterable[RecordedEvent], origins: Mapping[str, SessionOrigin]
) -> list[tuple[str, RecordedEvent]]:
    """The events that change a user summary, each with the user name it belongs to."""
    return [(user, e) for e in events if (user := _user_of(e, origins)) is not None]


def _user_of(recorded: RecordedEvent, origins: Mapping[str, SessionOrigin]) -> str | None:
    if is_principal(recorded):
        return principal_name_of(recorded.stream_id)
    if recorded.type in (SessionStarted.type_name, SessionEnded.type_name):
        return origins[recorded.stream_id].user
    return None


def summarise(row: UserSummary, recorded: RecordedEvent) -> UserSummary:
    """Fold one of the user's events into their summary."""
    event, at = recorded.event, recorded.occurred_at
    if isinstance(event, SessionStarted):
        last = at if row.last_login is None else max(row.last_login, at)
        return dataclasses.replace(
            row,
            sessions_started=row.sessions_started + 1,
            open_sessions=row.open_sessions + 1,
            last_login=last,
        )
    if isinstance(event, SessionEnded):
        return dataclasses.replace(row, open_sessions=max(row.open_sessions - 1, 0))
    if isinstance(event, LoginFailed):
        return dataclasses.replace(row, failures=row.failures + 1, last_failure=at)
    if isinstance(event, PrincipalLocked):
        return dataclasses.replace(row, locked_until=event.until)
    return row


# -- hourly statistics ----------------------------------------------------------------------------

HOURLY_STATS_NEEDS = (SessionEnded.type_name,)
"""The event types whose session origin the hourly statistics need (for session lengths)."""


@dataclass(frozen=True)
class HourlyStats:
    hour: datetime
    logins: int = 0
    login_failures: int = 0
    refreshes: int = 0
    reuse_detections: int = 0
    revocations: int = 0
    idle_expiries: int = 0
    absolute_expiries: int = 0
    session_seconds: tuple[int, ...] = field(default=())


_COUNTERS = {
    SessionStarted.type_name: "logins",
    LoginFailed.type_name: "login_failures",
    RefreshTokenRotated.type_name: "refreshes",
    RefreshTokenReuseDetected.type_name: "reuse_detections",
}
_ENDINGS = {
    "logout": "revocations",
    "idle_timeout": "idle_expiries",
    "absolute_timeout": "absolute_expiries",
}


def counted(events: Iterable[RecordedEvent]) -> list[RecordedEvent]:
    """The events the hourly statistics count."""
    return [e for e in events if e.type in _COUNTERS or e.type == SessionEnded.type_name]


def hour_of(moment: datetime) -> datetime:
    """The UTC hour an event is counted in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def tally(
    row: HourlyStats, recorded: RecordedEvent, origins: Mapping[str, SessionOrigin]
) -> HourlyStats:
    """Count one event of the row's hour; a session's end also records its length."""
    counter = _COUNTERS.get(recorded.type)
    if counter is not None:
        return dataclasses.replace(row, **{counter: getattr(row, counter) + 1})
    reason = recorded.event.reason  # type: ignore[attr-defined]
    length = int((recorded.occurred_at - origins[recorded.stream_id].started_at).total_seconds())
    row = dataclasses.replace(row, session_seconds=(*row.session_seconds, length))
    ending = _ENDINGS.get(reason)
    return row if ending is None else dataclasses.replace(row, **{ending: getattr(row, ending) + 1})


# -- alerts ---------------------------------------------------------------------------------------

ALERTS_NEED = (RefreshTokenReuseDetected.type_name, DpopProofRefused.type_name)
"""The event types whose session origin the alerts need (the user of a reused token, or of a
bound one presented without its key)."""


@dataclass(frozen=True)
class Alert:
    position: int
    kind: str
    occurred_at: datetime
    user_name: str | None
    session_id: str | None
    ip: str | None
    details: dict[str, JsonValue]


@dataclass(frozen=True)
class AddressFailures:
    ip: str
    recent: tuple[datetime, ...] = ()
    alerted_until: datetime | None = None
    names: tuple[str, ...] = ()
    """The user name each of `recent` was for (rows from before it was kept have none)."""


def failing_addresses(events: Iterable[RecordedEvent]) -> set[str]:
    """The addresses the batch's failed logins came from (their failure counts are folded)."""
    return {e.event.ip for e in events if isinstance(e.event, LoginFailed) and e.event.ip}


def alert_for(
    recorded: RecordedEvent,
    origins: Mapping[str, SessionOrigin],
    addresses: dict[str, AddressFailures],
) -> Alert | None:
    """The alert an event raises, if any; a failed login updates its address's count in
    `addresses` (a burst of BURST_FAILURES within BURST_WINDOW alerts once per window)."""
    event, at, position = recorded.event, recorded.occurred_at, recorded.position
    if isinstance(event, RefreshTokenReuseDetected):
        origin = origins[recorded.stream_id]
        session_id = session_id_of(recorded.stream_id)
        details: dict[str, JsonValue] = {
            "presented_generation": event.presented_generation,
            "current_generation": event.current_generation,
            "first_use": event.first_use,
            "grace_retries": list(event.grace_retries),
            "reuse": event.reuse,
        }
        ip = event.reuse.get("ip")
        return Alert(
            position,
            "reuse_detected",
            at,
            origin.user,
            session_id,
            ip if isinstance(ip, str) else None,
            details,
        )
    if isinstance(event, DpopProofRefused):
        origin = origins[recorded.stream_id]
        details = {"reason": event.reason, "jkt": event.jkt, "user_agent": event.user_agent}
        session_id = session_id_of(recorded.stream_id)
        return Alert(position, "dpop_refused", at, origin.user, session_id, event.ip, details)
    if isinstance(event, AuthorizationCodeReplayed):
        details = {"first_use": event.first_use, "user_agent": event.user_agent}
        return Alert(position, "code_replayed", at, None, event.session_id, event.ip, details)
    if isinstance(event, PrincipalLocked):
        name = principal_name_of(recorded.stream_id)
        details = {"until": format_timestamp(event.until), "failures": event.failures}
        return Alert(position, "lockout", at, name, None, None, details)
    if isinstance(event, LoginFailed) and event.ip:
        return _burst(recorded, event.ip, addresses)
    return None


def _burst(recorded: RecordedEvent, ip: str, addresses: dict[str, AddressFailures]) -> Alert | None:
    at = recorded.occurred_at
    row = addresses.get(ip) or AddressFailures(ip)
    unnamed = ("",) * (len(row.recent) - len(row.names))
    failures = [
        *zip(row.recent, (*unnamed, *row.names), strict=True),
        (at, principal_name_of(recorded.stream_id)),
    ]
    kept = [(t, n) for t, n in failures if at - t < BURST_WINDOW][-BURST_FAILURES:]
    recent, names = tuple(t for t, _ in kept), tuple(n for _, n in kept)
    quiet = row.alerted_until is None or at >= row.alerted_until
    if len(recent) < BURST_FAILURES or not quiet:
        addresses[ip] = dataclasses.replace(row, recent=recent, names=names)
        return None
    addresses[ip] = AddressFailures(ip, recent, at + BURST_WINDOW, names)
    tried = sorted({n for n in names if n})
    details: dict[str, JsonValue] = {
        "failures": len(recent),
        "window_seconds": int(BURST_WINDOW.total_seconds()),
        "since": format_timestamp(recent[0]),
        "user_names": list(tried),
    }
    # Filed under a user only when it is the only one tried; a spray across names is the
    # address's, and names them all in its details.
    user = tried[0] if len(tried) == 1 else None
    return Alert(recorded.position, "failure_burst", at, user, None, ip, details)
