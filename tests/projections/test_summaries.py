"""The summaries' pure folds, without a database: what each event does to a user's summary, to
its hour's statistics, and which alerts it raises."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from ledger.events import (
    Event,
    LoginFailed,
    PrincipalLocked,
    RefreshTokenReuseDetected,
    SessionEnded,
    SessionStarted,
    event_data,
)
from ledger.records import RecordedEvent
from ledger.serialization import canonical_json
from projections.streams import principal_stream, session_stream
from projections.summaries import (
    BURST_FAILURES,
    BURST_WINDOW,
    AddressFailures,
    HourlyStats,
    SessionOrigin,
    UserSummary,
    alert_for,
    by_user,
    hour_of,
    origins_in,
    summarise,
    tally,
)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
_positions = itertools.count(1)


def recorded(stream_id: str, version: int, event: Event) -> RecordedEvent:
    position = next(_positions)
    stream_type = stream_id.split(":")[0]
    at, data = event.occurred_at, canonical_json(event_data(event))
    row = (position, stream_id, stream_type, version, event.type_name, event.schema_version)
    return RecordedEvent.from_row((*row, at, at, position, data, "{}"))


def started(session_id: str, user: str, at: datetime) -> RecordedEvent:
    event = SessionStarted(
        occurred_at=at,
        user=user,
        client_id="spa",
        scope=(),
        refresh_token_hash="h",
        ip=None,
        user_agent=None,
    )
    return recorded(session_stream(session_id).id, 1, event)


def ended(session_id: str, at: datetime, reason: str = "logout") -> RecordedEvent:
    return recorded(session_stream(session_id).id, 2, SessionEnded(occurred_at=at, reason=reason))


def failed(user: str, at: datetime, ip: str | None = "192.0.2.1") -> RecordedEvent:
    event = LoginFailed(occurred_at=at, reason="bad_password", ip=ip, user_agent=None)
    return recorded(principal_stream(user).id, 1, event)


def test_a_batch_names_the_origins_it_starts_and_the_ones_to_look_up() -> None:
    batch = [started("s-1", "ada", T0), ended("s-1", T0), ended("s-2", T0), failed("bob", T0)]
    origins, missing = origins_in(batch, (SessionEnded.type_name,))
    assert origins == {session_stream("s-1").id: SessionOrigin("ada", T0)}
    assert missing == {session_stream("s-2").id}  # ended here, started in an earlier batch
    assert origins_in(batch, ())[1] == set()


def test_a_users_summary_counts_sessions_failures_and_the_lock() -> None:
    later = T0 + timedelta(hours=1)
    lock = PrincipalLocked(occurred_at=later, until=later + timedelta(minutes=15), failures=5)
    batch = [
        started("s-1", "ada", later),
        started("s-2", "ada", T0),  # older, but read later: last_login stays the latest
        ended("s-1", later),
        failed("ada", later),
        recorded(principal_stream("ada").id, 2, lock),
        started("s-3", "bob", T0),
    ]
    origins, _ = origins_in(batch, ())
    row = UserSummary("ada")
    for user, event in by_user(batch, origins):
        if user == "ada":
            row = summarise(row, event)
    assert row == UserSummary(
        "ada",
        sessions_started=2,
        open_sessions=1,
        last_login=later,
        failures=1,
        last_failure=later,
        locked_until=later + timedelta(minutes=15),
    )


def test_an_end_without_a_counted_start_leaves_no_negative_open_count() -> None:
    assert summarise(UserSummary("ada"), ended("s-1", T0)).open_sessions == 0


def test_an_hour_counts_each_ending_by_reason_and_every_sessions_length() -> None:
    origins = {session_stream(f"s-{i}").id: SessionOrigin("ada", T0) for i in range(4)}
    row = HourlyStats(hour_of(T0 + timedelta(minutes=59)))
    ends = [("logout", 60), ("idle_timeout", 120), ("absolute_timeout", 180), ("reuse", 240)]
    for i, (reason, seconds) in enumerate(ends):
        row = tally(row, ended(f"s-{i}", T0 + timedelta(seconds=seconds), reason), origins)
    row = tally(row, failed("ada", T0), origins)
    assert row == HourlyStats(
        T0,
        login_failures=1,
        revocations=1,
        idle_expiries=1,
        absolute_expiries=1,
        session_seconds=(60, 120, 180, 240),
    )


def test_hours_are_utc_hours() -> None:
    east = datetime(2026, 3, 1, 10, 30, tzinfo=UTC).astimezone()
    assert hour_of(east) == datetime(2026, 3, 1, 10, tzinfo=UTC)


def test_a_reused_token_alerts_naming_the_sessions_user_and_the_reusing_address() -> None:
    stream_id = session_stream("s-1").id
    reuse = RefreshTokenReuseDetected(
        occurred_at=T0,
        presented_generation=1,
        current_generation=2,
        first_use={"ip": "192.0.2.1"},
        grace_retries=({"generation": 1, "ip": "203.0.113.5"},),
        reuse={"ip": "198.51.100.7"},
    )
    alert = alert_for(recorded(stream_id, 3, reuse), {stream_id: SessionOrigin("ada", T0)}, {})
    assert alert is not None
    assert (alert.kind, alert.user_name, alert.session_id, alert.ip) == (
        "reuse_detected",
        "ada",
        "s-1",
        "198.51.100.7",
    )
    assert alert.details["grace_retries"] == [{"generation": 1, "ip": "203.0.113.5"}]


def _bursts_by_definition(times: list[datetime]) -> list[datetime]:
    """When failures from one address alert: BURST_FAILURES of them within BURST_WINDOW, at most
    once per window (the rule, computed over the whole history rather than incrementally)."""
    alerts: list[datetime] = []
    for i, at in enumerate(times):
        within = [t for t in times[: i + 1] if at - t < BURST_WINDOW]
        if len(within) >= BURST_FAILURES and (not alerts or at >= alerts[-1] + BURST_WINDOW):
            alerts.append(at)
    return alerts


@given(st.lists(st.integers(min_value=0, max_value=120), min_size=0, max_size=60))
def test_failure_bursts_alert_once_per_window(gaps: list[int]) -> None:
    times = [T0 + timedelta(seconds=s) for s in itertools.accumulate(gaps)]
    addresses: dict[str, AddressFailures] = {}
    raised = [
        alert.occurred_at
        for at in times
        if (alert := alert_for(failed("ada", at), {}, addresses)) is not None
    ]
    assert raised == _bursts_by_definition(times)


def test_a_failure_without_an_address_counts_toward_no_burst() -> None:
    addresses: dict[str, AddressFailures] = {}
    for _ in range(BURST_FAILURES):
        assert alert_for(failed("ada", T0, ip=None), {}, addresses) is None
    assert addresses == {}


def test_a_burst_across_several_user_names_is_filed_under_none_and_names_them_all() -> None:
    addresses: dict[str, AddressFailures] = {}
    names = ["ada", "bob", "carol", "ada", "dave"] * 2
    alerts = [
        alert_for(failed(name, T0 + timedelta(seconds=n)), {}, addresses)
        for n, name in enumerate(names)
    ]
    *quiet, alert = alerts
    assert quiet == [None] * 9
    assert alert is not None
    assert alert.user_name is None
    assert alert.details["user_names"] == ["ada", "bob", "carol", "dave"]


def test_a_burst_on_one_user_name_is_filed_under_it() -> None:
    addresses: dict[str, AddressFailures] = {}
    *_, alert = [
        alert_for(failed("ada", T0 + timedelta(seconds=n)), {}, addresses) for n in range(10)
    ]
    assert alert is not None
    assert (alert.user_name, alert.details["user_names"]) == ("ada", ["ada"])


def test_a_row_kept_before_names_were_counts_its_failures_without_names() -> None:
    old = AddressFailures("192.0.2.1", tuple(T0 + timedelta(seconds=n) for n in range(9)))
    addresses = {"192.0.2.1": old}
    alert = alert_for(failed("ada", T0 + timedelta(seconds=9)), {}, addresses)
    assert alert is not None
    assert (alert.user_name, alert.details["failures"]) == ("ada", 10)
