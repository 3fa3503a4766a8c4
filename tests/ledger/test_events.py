"""Pure tests of event types, canonical serialization and upcasting."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given

from ledger.errors import SerializationError, UnknownEventType
from ledger.events import (
    Event,
    PrincipalLocked,
    RefreshTokenReuseDetected,
    SessionEnded,
    SessionStarted,
    decode_event,
    event_class,
    event_data,
    registered_types,
    upcaster,
)
from ledger.serialization import (
    JsonValue,
    canonical_json,
    format_timestamp,
    parse_timestamp,
    to_json_value,
)
from tests.strategies import any_event, aware_datetimes, json_values

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class RenamedForTest(Event):
    """Version 2 renamed `who` to `user`; version 3 added `source`."""

    schema_version = 3
    user: str
    source: str


@upcaster("RenamedForTest", 1)
def _rename_who(data: dict[str, JsonValue]) -> dict[str, JsonValue]:
    data["user"] = data.pop("who")
    return data


@upcaster("RenamedForTest", 2)
def _add_source(data: dict[str, JsonValue]) -> dict[str, JsonValue]:
    return {**data, "source": "unknown"}


def test_session_vocabulary_is_registered() -> None:
    names = {cls.type_name for cls in registered_types()}
    assert {"SessionStarted", "RefreshTokenRotated", "LoginFailed", "SessionEnded"} <= names
    assert event_class("SessionEnded") is SessionEnded


@given(any_event())
def test_every_event_type_round_trips(event: Event) -> None:
    cls = type(event)
    data = event_data(event)
    decoded = decode_event(cls.type_name, cls.schema_version, data, event.occurred_at)
    assert decoded == event
    assert type(decoded) is cls


@given(json_values)
def test_canonical_json_does_not_depend_on_key_order(value: object) -> None:
    plain = to_json_value(value)
    if isinstance(plain, dict):
        reordered = dict(reversed(list(plain.items())))
        assert canonical_json(reordered) == canonical_json(plain)


@given(aware_datetimes)
def test_timestamps_round_trip_in_utc(moment: datetime) -> None:
    text = format_timestamp(moment)
    assert text.endswith("Z")
    assert parse_timestamp(text) == moment
    assert parse_timestamp(text).utcoffset() == timedelta(0)


def test_timestamp_format_is_fixed_width_utc() -> None:
    local = datetime(2026, 3, 1, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    assert format_timestamp(local) == "2026-03-01T09:30:00.000000Z"


def test_naive_timestamp_is_refused() -> None:
    event = PrincipalLocked(occurred_at=T0, until=datetime(2026, 3, 1, 9, 15), failures=5)
    with pytest.raises(SerializationError, match="no time zone"):
        event_data(event)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "float cannot be stored"),
        ("a\x00b", "NUL"),
        ("\ud800", "not valid Unicode"),
        ({1: "x"}, "keys must be strings"),
        (object(), "object cannot be stored"),
    ],
)
def test_unstorable_values_raise_serialization_error(value: object, message: str) -> None:
    event = SessionEnded(occurred_at=T0, reason=value)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=message):
        event_data(event)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"ip": "192.0.2.1", "hops": [1, 2, 0.5]}, "$.hops[2]"),
        ([{"ok": True}, {"deep": {"x\x00": 1}}], "$[1].deep"),
    ],
)
def test_serialization_error_names_the_path_of_the_bad_value(value: object, path: str) -> None:
    with pytest.raises(SerializationError) as caught:
        to_json_value(value)
    assert str(caught.value).startswith(f"{path}: ")


def test_unknown_type_name_raises_typed_error() -> None:
    with pytest.raises(UnknownEventType) as caught:
        decode_event("NoSuchThingHappened", 1, {}, T0)
    assert caught.value.type_name == "NoSuchThingHappened"


def test_base_event_is_not_a_storable_type() -> None:
    with pytest.raises(UnknownEventType):
        event_data(Event(occurred_at=T0))


def test_old_payloads_are_upcast_step_by_step() -> None:
    event = decode_event("RenamedForTest", 1, {"who": "ada"}, T0)
    assert event == RenamedForTest(occurred_at=T0, user="ada", source="unknown")
    assert decode_event("RenamedForTest", 2, {"user": "ada"}, T0) == event


def test_reuse_evidence_recorded_before_grace_retries_were_events_reads_with_none() -> None:
    stored: dict[str, JsonValue] = {
        "presented_generation": 1,
        "current_generation": 3,
        "first_use": {"at": None, "ip": None, "user_agent": None},
        "reuse": {"at": "2026-03-01T09:00:00Z", "ip": "192.0.2.1", "user_agent": None},
    }
    event = decode_event("RefreshTokenReuseDetected", 1, stored, T0)
    assert isinstance(event, RefreshTokenReuseDetected)
    assert event.grace_retries == ()
    assert event_data(event) == {**stored, "grace_retries": []}


def test_a_session_started_before_dpop_reads_as_bound_to_no_key() -> None:
    stored: dict[str, JsonValue] = {
        "user": "ada",
        "client_id": "spa",
        "scope": [],
        "refresh_token_hash": "ab" * 32,
        "ip": None,
        "user_agent": None,
    }
    event = decode_event("SessionStarted", 1, stored, T0)
    assert isinstance(event, SessionStarted)
    assert event.jkt is None
    assert event_data(event) == {**stored, "jkt": None}


def test_payload_from_a_newer_schema_is_refused() -> None:
    with pytest.raises(SerializationError, match="schema version 4"):
        decode_event("RenamedForTest", 4, {"user": "ada", "source": "x"}, T0)


def test_missing_upcaster_is_reported() -> None:
    with pytest.raises(SerializationError, match="no upcaster from schema version 1"):
        decode_event("LoginFailedV2ForTest", 1, {}, T0)


@dataclass(frozen=True, kw_only=True)
class LoginFailedV2ForTest(Event):
    schema_version = 2


def test_unexpected_or_missing_fields_raise_serialization_error() -> None:
    with pytest.raises(SerializationError, match="unexpected fields"):
        decode_event("SessionEnded", 1, {"reason": "logout", "extra": 1}, T0)
    with pytest.raises(SerializationError, match="reason"):
        decode_event("SessionEnded", 1, {}, T0)


def test_registering_a_type_name_twice_fails() -> None:
    with pytest.raises(TypeError, match="already registered"):

        class SessionEnded(Event):
            pass
