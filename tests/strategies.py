"""Hypothesis strategies for events and JSON payloads."""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from ledger.events import Event, registered_types
from ledger.serialization import JsonValue

# Storable text: jsonb cannot hold NUL, and lone surrogates are not Unicode.
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)

aware_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    ),
)

json_values: st.SearchStrategy[JsonValue] = st.recursive(
    st.none() | st.booleans() | st.integers() | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=10,
)
json_objects = st.dictionaries(text, json_values, max_size=5)


def _for_hint(hint: Any) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_for_hint(arg) for arg in args])
    if origin is tuple:
        return st.lists(_for_hint(args[0]), max_size=4).map(tuple)
    if origin is dict:
        return json_objects
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: text,
        int: st.integers(),
        bool: st.booleans(),
        datetime: aware_datetimes,
        type(None): st.none(),
    }
    return simple[hint]


def events_of(cls: type[Event]) -> st.SearchStrategy[Event]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: _for_hint(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **fields)


def any_event() -> st.SearchStrategy[Event]:
    return st.one_of([events_of(cls) for cls in registered_types()])
