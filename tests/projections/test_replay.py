"""Point-in-time and what-if replays over recorded history (written as the service writes it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from psycopg_pool import ConnectionPool

from ledger.clock import ManualClock
from ledger.events import SessionEnded
from ledger.store import EventStore
from projections.replay import Ending, as_of, parse_policy_changes, what_if
from projections.session import Decision, Outcome
from tests.projections.histories import (
    POLICY,
    T0,
    Writer,
    all_events,
    stream_events,
    write_varied_history,
)

US = timedelta(microseconds=1)
IDLE = POLICY.idle_timeout


def minutes(m: float) -> timedelta:
    return timedelta(minutes=m)


def go(writer: Writer, moment: datetime) -> None:
    writer.advance(moment - writer.clock.now())


@pytest.fixture
def writer(pool: ConnectionPool, store: EventStore) -> Writer:
    return Writer(pool, store, ManualClock(T0))


def login(writer: Writer, user: str = "ada") -> str:
    session_id = writer.login(user)
    assert session_id is not None
    return session_id


def lived(writer: Writer) -> str:
    """Login at T0, a refresh at +5 min (generation 2), activity at +20 min."""
    session_id = login(writer)
    go(writer, T0 + minutes(5))
    assert writer.refresh(session_id, 1).outcome is Outcome.OK
    go(writer, T0 + minutes(20))
    assert writer.activity(session_id).events
    return session_id


# -- as_of ----------------------------------------------------------------------------------------


def test_as_of_before_the_start_is_not_started(writer: Writer, store: EventStore) -> None:
    session_id = lived(writer)
    events = stream_events(store, session_id)

    before = as_of(session_id, events, T0 - US, POLICY)

    assert (before.status, before.state, before.idle_for, before.is_valid) == (
        "not_started",
        None,
        None,
        False,
    )
    assert as_of("never-started", [], T0, POLICY).status == "not_started"


def test_as_of_during_the_session_is_valid_with_idle_time_and_generation(
    writer: Writer, store: EventStore
) -> None:
    session_id = lived(writer)
    events = stream_events(store, session_id)

    def seen(moment: datetime) -> tuple[str, int, timedelta | None, int]:
        point = as_of(session_id, events, moment, POLICY)
        assert point.state is not None
        assert point.as_of == moment
        return point.status, point.state.generation, point.idle_for, point.state.version

    assert seen(T0) == ("valid", 1, timedelta(0), 1)
    assert seen(T0 + minutes(5) - US) == ("valid", 1, minutes(5) - US, 1)
    assert seen(T0 + minutes(5)) == ("valid", 2, timedelta(0), 3)  # rotation and its activity
    assert seen(T0 + minutes(12)) == ("valid", 2, minutes(7), 3)
    assert seen(T0 + minutes(30)) == ("valid", 2, minutes(10), 4)
    assert seen(T0 + minutes(80) - US) == ("valid", 2, IDLE - US, 4)


@pytest.mark.parametrize("recorded", ["never", "by_refused_refresh", "by_sweep"])
def test_as_of_after_idle_expiry_is_idle_timeout_whether_or_not_recorded(
    recorded: str, writer: Writer, store: EventStore
) -> None:
    session_id = lived(writer)
    go(writer, T0 + minutes(150))
    if recorded == "by_refused_refresh":
        assert writer.refresh(session_id, 2).outcome is Outcome.IDLE_TIMEOUT
    elif recorded == "by_sweep":
        assert writer.expire(session_id).outcome is Outcome.IDLE_TIMEOUT
    events = stream_events(store, session_id)
    expiry = T0 + minutes(80)  # last activity at +20 min, plus the 60 min idle timeout
    if recorded != "never":
        assert events[-1] == SessionEnded(occurred_at=expiry, reason="idle_timeout")

    for moment in (expiry, expiry + minutes(1), T0 + minutes(150)):
        point = as_of(session_id, events, moment, POLICY)
        assert point.state is not None
        assert point.state.generation == 2
        # Idle time stops at the expiry: the session was idle 60 minutes, however late one looks.
        assert point.idle_for == expiry - (T0 + minutes(20))
        assert (point.status, point.is_valid) == ("idle_timeout", False), (recorded, moment)
    assert as_of(session_id, events, expiry - US, POLICY).status == "valid"


@pytest.mark.parametrize("recorded", ["never", "by_refused_refresh"])
def test_as_of_after_the_absolute_end_is_absolute_timeout(
    recorded: str, writer: Writer, store: EventStore
) -> None:
    session_id = login(writer)
    refreshes = 9 if recorded == "by_refused_refresh" else 8
    for n in range(1, refreshes + 1):  # active every 55 minutes: only the absolute limit ends it
        go(writer, T0 + minutes(55 * n))
        writer.refresh_current(session_id)
    events = stream_events(store, session_id)
    end = T0 + POLICY.absolute_timeout
    if recorded != "never":
        assert events[-1] == SessionEnded(occurred_at=end, reason="absolute_timeout")

    assert as_of(session_id, events, end - US, POLICY).status == "valid"
    for moment in (end, end + minutes(30)):
        point = as_of(session_id, events, moment, POLICY)
        assert (point.status, point.is_valid) == ("absolute_timeout", False), (recorded, moment)


@pytest.mark.parametrize("reason", ["logout", "reuse_detected"])
def test_as_of_after_revocation_is_ended_with_the_reason(
    reason: str, writer: Writer, store: EventStore
) -> None:
    session_id = login(writer)
    go(writer, T0 + minutes(5))
    assert writer.refresh(session_id, 1).outcome is Outcome.OK
    go(writer, T0 + minutes(5) + POLICY.refresh_grace)
    assert writer.refresh(session_id, 1).outcome is Outcome.GRACE_RETRY  # a recorded retry
    revoked_at = T0 + minutes(30)
    go(writer, revoked_at)
    decision = writer.logout(session_id) if reason == "logout" else writer.refresh(session_id, 1)
    assert decision.events
    events = stream_events(store, session_id)

    assert as_of(session_id, events, revoked_at - US, POLICY).status == "valid"
    for moment in (revoked_at, revoked_at + timedelta(hours=12)):
        point = as_of(session_id, events, moment, POLICY)
        assert point.state is not None
        assert (point.status, point.state.end_reason, point.state.ended_at) == (
            "ended",
            reason,
            revoked_at,
        )
        assert point.state.generation == 2


# -- what_if --------------------------------------------------------------------------------------

Action = Callable[[Writer, str], Decision]
ACTIONS: dict[str, Action] = {
    "activity": lambda w, s: w.activity(s),
    "refresh": lambda w, s: w.refresh_current(s),
    "logout": lambda w, s: w.logout(s),
    "reuse": lambda w, s: w.refresh(s, 1),
}
# Each session's life: (minutes after its login, action). Sessions run one after the other.
LIVES: dict[str, list[tuple[int, str]]] = {
    "steady": [
        (10, "activity"),
        (20, "activity"),
        (30, "refresh"),
        (40, "activity"),
        (45, "logout"),
    ],
    "gap35": [(5, "activity"), (40, "activity"), (45, "logout")],
    "gap30_exactly": [(5, "activity"), (35, "activity"), (40, "logout")],
    "gap29": [(5, "activity"), (34, "activity"), (36, "logout")],
    "gap50_by_refresh": [(50, "refresh"), (52, "logout")],
    "logout_after_gap50": [(5, "activity"), (55, "logout")],
    "idled_silently": [(10, "activity")],
    "idled_recorded": [(10, "activity"), (150, "refresh")],  # refused: records the expiry
    "reuse": [(5, "refresh"), (20, "reuse")],
    "absolute": [*((25 * n, "activity") for n in range(1, 20)), (500, "refresh")],
}
SPACING = timedelta(hours=10)


def write_lives(writer: Writer) -> dict[str, tuple[str, datetime]]:
    """Every session of LIVES: its id and login time."""
    written: dict[str, tuple[str, datetime]] = {}
    for k, (name, steps) in enumerate(LIVES.items()):
        base = T0 + k * SPACING
        go(writer, base)
        session_id = login(writer, name)
        for minute, action in steps:
            go(writer, base + minutes(minute))
            ACTIONS[action](writer, session_id)
        written[name] = session_id, base
    return written


def names(changes: list[object], ids: dict[str, str]) -> set[str]:
    by_id = {v: k for k, v in ids.items()}
    return {by_id[c.session_id] for c in changes}  # type: ignore[attr-defined]


def test_what_if_under_the_current_policy_changes_nothing(
    writer: Writer, store: EventStore
) -> None:
    write_lives(writer)
    write_varied_history(writer)
    events = all_events(store)
    sessions = len({e.stream_id for e in events if e.stream_type == "session"})

    result = what_if(events, POLICY, dataclasses.replace(POLICY))

    assert (result.sessions, result.earlier, result.later) == (sessions, [], [])


def test_what_if_shorter_idle_names_exactly_the_sessions_with_longer_gaps(
    writer: Writer, store: EventStore
) -> None:
    lives = write_lives(writer)
    ids = {name: session_id for name, (session_id, _) in lives.items()}

    result = what_if(
        all_events(store), POLICY, dataclasses.replace(POLICY, idle_timeout=minutes(30))
    )

    assert result.sessions == len(LIVES)
    assert result.later == []
    assert names(list(result.earlier), ids) == {
        "gap35",
        "gap30_exactly",  # idle for exactly the timeout is no longer valid (DESIGN.md)
        "gap50_by_refresh",
        "logout_after_gap50",
        "idled_silently",
        "idled_recorded",
    }
    by_name = {name: c for c in result.earlier for name, i in ids.items() if i == c.session_id}
    _, base = lives["gap35"]
    assert by_name["gap35"].actual == Ending(base + minutes(45), "logout")
    assert by_name["gap35"].what_if == Ending(base + minutes(35), "idle_timeout")
    assert by_name["gap35"].user == "gap35"
    _, base = lives["idled_recorded"]
    assert by_name["idled_recorded"].actual == Ending(base + minutes(70), "idle_timeout")
    assert by_name["idled_recorded"].what_if == Ending(base + minutes(40), "idle_timeout")


def test_what_if_longer_idle_names_the_sessions_that_idled_out_as_later(
    writer: Writer, store: EventStore
) -> None:
    lives = write_lives(writer)
    ids = {name: session_id for name, (session_id, _) in lives.items()}

    result = what_if(
        all_events(store), POLICY, dataclasses.replace(POLICY, idle_timeout=minutes(90))
    )

    assert result.earlier == []
    assert names(list(result.later), ids) == {"idled_silently", "idled_recorded"}
    for change in result.later:
        (base,) = [b for s, b in lives.values() if s == change.session_id]
        assert change.actual == Ending(base + minutes(70), "idle_timeout")
        assert change.what_if == Ending(base + minutes(100), "idle_timeout")
        assert not change.ends_earlier


def test_what_if_shorter_absolute_limit_and_idle_together(
    writer: Writer, store: EventStore
) -> None:
    lives = write_lives(writer)
    ids = {name: session_id for name, (session_id, _) in lives.items()}
    other = parse_policy_changes("idle=30m,absolute=4h", POLICY)

    result = what_if(all_events(store), POLICY, other)

    earlier = names(list(result.earlier), ids)
    assert "absolute" in earlier
    (absolute,) = [c for c in result.earlier if c.session_id == ids["absolute"]]
    _, base = lives["absolute"]
    assert absolute.actual == Ending(base + POLICY.absolute_timeout, "absolute_timeout")
    assert absolute.what_if == Ending(base + timedelta(hours=4), "absolute_timeout")
    assert earlier - {"absolute"} == names(
        list(
            what_if(
                all_events(store), POLICY, dataclasses.replace(POLICY, idle_timeout=minutes(30))
            ).earlier
        ),
        ids,
    )


def test_what_if_since_counts_only_sessions_started_since_then(
    writer: Writer, store: EventStore
) -> None:
    lives = write_lives(writer)
    ids = {name: session_id for name, (session_id, _) in lives.items()}
    _, since = lives["logout_after_gap50"]  # the sixth session's login
    shorter = dataclasses.replace(POLICY, idle_timeout=minutes(30))

    result = what_if(all_events(store), POLICY, shorter, since=since)

    assert result.sessions == len(LIVES) - 5
    assert names(list(result.earlier), ids) == {
        "logout_after_gap50",
        "idled_silently",
        "idled_recorded",
    }


def test_what_if_since_skips_a_session_started_before_but_active_after(
    writer: Writer, store: EventStore
) -> None:
    early = login(writer, "early")  # logs in before `since` ...
    go(writer, T0 + minutes(10))
    since = writer.clock.now()
    late = login(writer, "late")
    go(writer, T0 + minutes(50))
    writer.activity(early)  # ... and is active after it
    writer.activity(late)
    shorter = dataclasses.replace(POLICY, idle_timeout=minutes(30))

    result = what_if(all_events(store), POLICY, shorter, since=since)

    assert result.sessions == 1
    assert [c.session_id for c in result.earlier] == [late]


def test_what_if_does_not_call_a_session_later_when_it_ends_at_the_same_moment(
    writer: Writer, store: EventStore
) -> None:
    session_id = login(writer)
    go(writer, T0 + minutes(10))
    writer.activity(session_id)  # then silence: it idles out at +70 min
    other = dataclasses.replace(POLICY, absolute_timeout=minutes(70))  # ends at +70 min too

    result = what_if(all_events(store), POLICY, other)

    assert (result.sessions, result.earlier, result.later) == (1, [], [])
