"""Event types: frozen dataclasses named in the past tense, a registry by name, upcasting."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from ledger.errors import SerializationError, UnknownEventType
from ledger.serialization import JsonValue, parse_timestamp, to_json_value

Upcaster = Callable[[dict[str, JsonValue]], dict[str, JsonValue]]

_registry: dict[str, type[Event]] = {}
_upcasters: dict[tuple[str, int], Upcaster] = {}


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event: something that happened at `occurred_at`; subclasses add the payload."""

    occurred_at: datetime

    type_name: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__
        if cls.type_name in _registry:
            raise TypeError(f"event type {cls.type_name!r} is already registered")
        _registry[cls.type_name] = cls


def event_class(type_name: str) -> type[Event]:
    """Return the registered class for a type name."""
    try:
        return _registry[type_name]
    except KeyError:
        raise UnknownEventType(type_name) from None


def unknown_types(names: Iterable[str]) -> list[str]:
    """The names, in order, that no registered event type has."""
    known = {cls.type_name for cls in registered_types()}
    return [name for name in names if name not in known]


def registered_types() -> list[type[Event]]:
    """Every registered event class, in registration order."""
    return list(_registry.values())


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that turns a `from_version` payload of `type_name` into the next."""

    def register(function: Upcaster) -> Upcaster:
        _upcasters[(type_name, from_version)] = function
        return function

    return register


def event_data(event: Event) -> dict[str, JsonValue]:
    """The event's payload as plain JSON: all fields but `occurred_at`, which the envelope keeps."""
    cls = type(event)
    if _registry.get(getattr(cls, "type_name", "")) is not cls:
        raise UnknownEventType(cls.__name__)
    payload = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    del payload["occurred_at"]
    data = to_json_value(payload, f"${cls.type_name}")
    assert isinstance(data, dict)
    return data


def decode_event(
    type_name: str, schema_version: int, data: Mapping[str, JsonValue], occurred_at: datetime
) -> Event:
    """Rebuild an event from stored JSON, upcasting payloads written by older schema versions."""
    cls = event_class(type_name)
    payload = data
    if schema_version != cls.schema_version:
        payload = _upcast(type_name, schema_version, cls.schema_version, dict(data))
    converters = _converters(type_name)
    unknown = payload.keys() - converters.keys()
    if unknown:
        raise SerializationError(f"{type_name}: unexpected fields {sorted(unknown)}")
    try:
        values = {
            name: value if (convert := converters[name]) is None else convert(value)
            for name, value in payload.items()
        }
        return cls(occurred_at=occurred_at, **values)
    except (TypeError, ValueError) as e:
        raise SerializationError(f"{type_name}: {e}") from e


def _upcast(
    type_name: str, stored: int, current: int, data: dict[str, JsonValue]
) -> dict[str, JsonValue]:
    if stored > current:
        raise SerializationError(
            f"{type_name} was written at schema version {stored}; this code knows up to {current}"
        )
    for version in range(stored, current):
        step = _upcasters.get((type_name, version))
        if step is None:
            raise SerializationError(f"{type_name}: no upcaster from schema version {version}")
        data = step(data)
    return data


Converter = Callable[[JsonValue], Any]


@functools.cache
def _converters(type_name: str) -> dict[str, Converter | None]:
    """Per field, what undoes to_json_value (None: the JSON value is the field's value).

    Worked out once per type from the type hints, because readers decode every event they fold.
    """
    cls = _registry[type_name]
    hints = typing.get_type_hints(cls)
    fields = (f.name for f in dataclasses.fields(cls) if f.name != "occurred_at")
    return {name: _converter(hints[name]) for name in fields}


def _converter(hint: Any) -> Converter | None:
    """Undo to_json_value for the field types events use: datetimes and tuples."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        inner = _converter(options[0]) if len(options) == 1 else None
        if inner is None:
            return None
        return lambda value: None if value is None else inner(value)
    if hint is datetime:
        return _timestamp
    if typing.get_origin(hint) is tuple:
        item = _converter(typing.get_args(hint)[0])
        return lambda value: (
            tuple(v if item is None or v is None else item(v) for v in value)
            if isinstance(value, list)
            else value
        )
    return None


def _timestamp(value: JsonValue) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected a timestamp string, got {type(value).__name__}")
    return parse_timestamp(value)


# The session vocabulary. A session stream (stream_type "session") holds one session's life; a
# principal stream (stream_type "principal") holds one user's failed logins and lockouts.


@dataclass(frozen=True, kw_only=True)
class SessionStarted(Event):
    """A user logged in through a client and a session began; `jkt`, when the login came with
    a DPoP proof (RFC 9449), is its key's RFC 7638 thumbprint, to which the session is bound."""

    schema_version: ClassVar[int] = 2

    user: str
    client_id: str
    scope: tuple[str, ...]
    refresh_token_hash: str
    ip: str | None
    user_agent: str | None
    jkt: str | None = None


@upcaster("SessionStarted", 1)
def _started_without_dpop(data: dict[str, JsonValue]) -> dict[str, JsonValue]:
    # Version 1 had no DPoP: no session was bound to a key.
    return {**data, "jkt": None}


@dataclass(frozen=True, kw_only=True)
class RefreshTokenRotated(Event):
    """A refresh token was exchanged; `generation` is the new current one.

    `ip` and `user_agent` are the exchanging request's, kept as evidence should the retired token
    be presented again.
    """

    generation: int
    refresh_token_hash: str
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class ActivityRecorded(Event):
    """The client reported user activity in the session."""


@dataclass(frozen=True, kw_only=True)
class RefreshTokenRetried(Event):
    """The previous refresh token was presented again within the grace window and got the
    current one again: two tabs or a lost response, or a thief who was quick. `generation` is
    the presented one; `ip` and `user_agent` are the retrying request's, kept as evidence."""

    generation: int
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class RefreshTokenReuseDetected(Event):
    """A rotated refresh token was presented again outside the grace window (or, with
    LEDGER_REFRESH_GRACE_SAME_CLIENT, from another user agent within it).

    The evidence: `first_use` (the rotation that retired the presented token), `grace_retries`
    (the session's retries in grace that its state still keeps, each with the generation it
    presented) and `reuse` (this request), each with its time, address and user agent.
    """

    schema_version: ClassVar[int] = 2

    presented_generation: int
    current_generation: int
    first_use: dict[str, JsonValue]
    grace_retries: tuple[dict[str, JsonValue], ...]
    reuse: dict[str, JsonValue]


@upcaster("RefreshTokenReuseDetected", 1)
def _reuse_without_grace_retries(data: dict[str, JsonValue]) -> dict[str, JsonValue]:
    # Version 1 recorded nothing of grace retries, as none were recorded as events then.
    return {**data, "grace_retries": []}


@dataclass(frozen=True, kw_only=True)
class DpopProofRefused(Event):
    """A refresh or a revocation of the session, which is bound to a DPoP key, came without a
    proof (`reason` `missing`) or with another key's (`another_key`, whose thumbprint is `jkt`),
    from `ip` with `user_agent`. The session goes on, unless LEDGER_DPOP_MISMATCH_REVOKES."""

    reason: str
    jkt: str | None
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class SessionEnded(Event):
    """The session ended; `reason` is logout, reuse_detected, idle_timeout or absolute_timeout."""

    reason: str


@dataclass(frozen=True, kw_only=True)
class LoginFailed(Event):
    """A login attempt for the principal failed."""

    reason: str
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class PrincipalLocked(Event):
    """Too many failed logins: the principal may not log in until `until`."""

    until: datetime
    failures: int


@dataclass(frozen=True, kw_only=True)
class PrincipalUnlocked(Event):
    """An administrator lifted the principal's lock (`users unlock`); its failures count anew."""


@dataclass(frozen=True, kw_only=True)
class UserRemoved(Event):
    """The user was deleted (`users remove`); their sessions end with reason `user_removed`."""


@dataclass(frozen=True, kw_only=True)
class UserDisabled(Event):
    """The user may not log in any more (`users disable`); their sessions end with reason
    `user_disabled`. The account stays, and `users enable` (UserEnabled) restores it."""


@dataclass(frozen=True, kw_only=True)
class UserEnabled(Event):
    """The user, disabled before, may log in again (`users enable`)."""


@dataclass(frozen=True, kw_only=True)
class PasswordChanged(Event):
    """The user's password was replaced (`users set-password`); their sessions end with reason
    `password_changed`. The password and its hash are never recorded."""


@dataclass(frozen=True, kw_only=True)
class UserScopesChanged(Event):
    """The user now holds `scopes` (`users set-scopes`); sessions holding any other scope end
    with reason `scopes_changed`."""

    scopes: tuple[str, ...]


# A client stream (stream_type "client") holds one client id's failed authentications and locks,
# and its client_credentials grants.


@dataclass(frozen=True, kw_only=True)
class ClientAuthenticationFailed(Event):
    """A request authenticating as the client failed: `reason` is `wrong_secret`,
    `unknown_client`, `not_confidential` (a secret sent for a public client) or `locked`."""

    reason: str
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class ClientRemoved(Event):
    """The client was deleted (`clients remove`); its sessions end with reason
    `client_removed`."""


@dataclass(frozen=True, kw_only=True)
class ClientCredentialsGranted(Event):
    """The client got an access token of its own (the client_credentials grant, RFC 6749 §4.4)
    holding `scope`, asked for from `ip` with `user_agent`."""

    scope: tuple[str, ...]
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class ClientLocked(Event):
    """Too many failed authentications: the client may not authenticate until `until`."""

    until: datetime
    failures: int


# A signal stream (stream_type "signal-stream") holds one Shared Signals event stream's history:
# its creation, status changes, verification requests, refused events and deletion.


@dataclass(frozen=True, kw_only=True)
class SignalStreamCreated(Event):
    """The client created a Shared Signals stream delivering `events_delivered` by `method`
    (urn:ietf:rfc:8935 push to `endpoint_url`, or urn:ietf:rfc:8936 poll). A push endpoint's
    authorization header is the receiver's secret: never recorded."""

    client_id: str
    method: str
    endpoint_url: str | None
    events_delivered: tuple[str, ...]
    description: str | None
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class SignalStreamStatusChanged(Event):
    """The stream is now `status` (enabled, paused or disabled), for `reason` if one was given."""

    status: str
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class SignalVerificationRequested(Event):
    """The receiver asked for a verification event echoing `state`; the event is delivered on
    the stream in its turn."""

    state: str | None


@dataclass(frozen=True, kw_only=True)
class SecurityEventRejected(Event):
    """The receiver refused the SET `jti` with the RFC 8935/8936 error `err`; it is not sent
    again."""

    jti: str
    err: str
    description: str | None


@dataclass(frozen=True, kw_only=True)
class SignalStreamDeleted(Event):
    """The client deleted the stream; nothing is delivered on it any more."""

    ip: str | None
    user_agent: str | None


# A browser-refusal stream (stream_type "browser-refusal") holds one refused cross-site request.


@dataclass(frozen=True, kw_only=True)
class BrowserRequestRefused(Event):
    """A cookie-authenticated browser request failed the CSRF or cookie checks and was refused.

    `reason` is `origin` (Origin missing or not allowed), `header` (no X-Requested-With) or
    `cookies` (more than one refresh cookie: one was planted, or left from elsewhere).
    """

    endpoint: str
    reason: str
    origin: str | None


@dataclass(frozen=True, kw_only=True)
class AuthorizationCodeIssued(Event):
    """The user `user` logged in at the authorization endpoint (from `ip` with `user_agent`) and
    got a code for `client_id`, bound to `redirect_uri` and the PKCE `code_challenge` (S256),
    holding `scope`, redeemable until `expires_at`. Its stream is named after the code's
    SHA-256; the code itself is stored nowhere."""

    user: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: tuple[str, ...]
    expires_at: datetime
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class AuthorizationCodeRedeemed(Event):
    """The code was exchanged for the session `session_id`, from `ip` with `user_agent`."""

    session_id: str
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class AuthorizationCodeRefused(Event):
    """A redemption of the code was refused (`reason`: expired, client, redirect_uri,
    verifier), from `ip` with `user_agent`; the code stays redeemable until it expires."""

    reason: str
    ip: str | None
    user_agent: str | None


@dataclass(frozen=True, kw_only=True)
class AuthorizationCodeReplayed(Event):
    """The code, already redeemed, was presented again from `ip` with `user_agent`: refused,
    and the session its redemption started (`session_id`) ended (RFC 6749 §4.1.2). The first
    redemption's request is in `first_use` (`at`, `ip`, `user_agent`)."""

    session_id: str
    first_use: dict[str, JsonValue]
    ip: str | None
    user_agent: str | None
