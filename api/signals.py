"""OpenID Shared Signals (SSF 1.0): event streams that tell receivers elsewhere of every session
end, as CAEP `session-revoked` Security Event Tokens (RFC 8417), by poll (RFC 8936) or push
(RFC 8935).

A stream belongs to the receiver (a client) that created it. Its history (creation, status
changes, verification requests, refused SETs, deletion) is events on its `signal-stream:<id>`
stream; its `signal_streams` row holds what delivery needs besides: the cursor, the checkpoint up
to which nothing is left to deliver, with poll acknowledgements ahead of it, and the push retry
state. A stream delivers what the ledger records after its creation: every SessionEnded (while
`session-revoked` is among its `events_delivered`) and its own verification requests, in the
gap-safe order. Nothing is delivered while it is paused, and nothing is dropped; a disabled
stream holds nothing and resumes at the ledger's head when enabled again.

A SET is made from its event alone (jti, iat and claims), so a redelivery is the same token.
Every row change happens under the row's lock in one short transaction with its event; a push
is made outside any transaction, under a session-level advisory lock per stream, so that one
process at a time pushes a stream and no transaction stays open while a receiver answers.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from api.cursors import decode_cursor, encode_cursor
from api.errors import InvalidRequest, NotFound
from api.keys import EVENT_KEY_ALGORITHM, EventSigningKey, Sealer
from ledger.db import connect, first_line, translated_errors
from ledger.events import (
    Event,
    SecurityEventRejected,
    SessionEnded,
    SessionStarted,
    SignalStreamCreated,
    SignalStreamDeleted,
    SignalStreamStatusChanged,
    SignalVerificationRequested,
)
from ledger.periodic import Periodic
from ledger.records import Checkpoint, RecordedEvent
from ledger.serialization import JsonValue
from ledger.store import EventStore
from projections.streams import session_id_of, signal_stream

PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"
DELIVERY_METHODS = (PUSH, POLL)
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
EVENTS_SUPPORTED = (SESSION_REVOKED,)
"""What a stream may ask for; a verification event is sent on every stream when asked for."""
MANAGE_SCOPE = "ssf.manage"
"""The client scope to create, change and delete streams (and to read and poll them)."""
READ_SCOPE = "ssf.read"
"""The client scope to read streams and their status, and to poll them."""
STATUSES = ("enabled", "paused", "disabled")
SET_TYPE = "secevent+jwt"

MAX_EVENTS = 100
"""The most SETs one poll returns, and one push pass sends per stream."""
_PAGE = 500
_MAX_TEXT = 1000
_MAX_ACKS = 1000
_RETRY_CAP_SECONDS = 60
_PUSH_LOCK_CLASS = 7261005
"""The advisory lock class (two-key form, with the stream id's hashtext) of a stream's pusher."""
# Who ended a session, in CAEP's terms (`initiating_entity`); anything else was an admin's act.
_INITIATOR = {
    "logout": "user",
    "reuse_detected": "policy",
    "dpop_refused": "policy",
    "code_replayed": "policy",
    "idle_timeout": "system",
    "absolute_timeout": "system",
}

_log = logging.getLogger("session_ledger.signals")


@dataclass(frozen=True)
class SignalStream:
    """One stream's configuration and delivery state (its `signal_streams` row)."""

    stream_id: str
    client_id: str
    method: str
    endpoint_url: str | None
    """The receiver's push endpoint; None for poll, whose endpoint is ours."""
    events_delivered: tuple[str, ...]
    description: str | None
    status: str
    reason: str | None
    cursor: Checkpoint
    acked_ahead: frozenset[Checkpoint]
    failures: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True)
class Pending:
    """What a stream has to deliver next, oldest first, and how far its cursor may move."""

    sets: list[tuple[str, str]]
    """(jti, SET) for each."""
    clear: Checkpoint
    """Nothing is left to deliver up to here (every event before the first SET is done)."""
    more: bool
    """More SETs wait beyond these."""


class Signals:
    """The stream registry and the SETs each stream delivers (blocking I/O throughout)."""

    def __init__(
        self,
        pool: ConnectionPool,
        key: EventSigningKey,
        sealer: Sealer,
        *,
        issuer: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._pool = pool
        self._store = EventStore(pool)
        self._key = key
        self._sealer = sealer
        self.issuer = issuer
        self._clock = clock

    @property
    def key(self) -> EventSigningKey:
        return self._key

    # -- the management API ----------------------------------------------------------------------

    def create(
        self,
        client_id: str,
        *,
        method: str,
        endpoint_url: str | None,
        authorization_header: str | None,
        events_requested: Sequence[str] | None,
        description: str | None,
        meta: Mapping[str, object],
    ) -> SignalStream:
        """A new stream for the client; InvalidRequest for a method, endpoint or text it cannot
        take. Unknown requested events are ignored (SSF 1.0 §8.1.1); none asked for means all."""
        if method not in DELIVERY_METHODS:
            raise InvalidRequest(f"delivery method must be one of {', '.join(DELIVERY_METHODS)}")
        if method == PUSH:
            endpoint_url = _push_endpoint(endpoint_url)
        elif endpoint_url is not None or authorization_header is not None:
            raise InvalidRequest("a poll stream's endpoint_url is the transmitter's to give")
        _check_text(description, "description")
        _check_text(authorization_header, "authorization_header")
        requested = EVENTS_SUPPORTED if events_requested is None else tuple(events_requested)
        delivered = tuple(e for e in EVENTS_SUPPORTED if e in requested)
        header: tuple[bytes | None, bool] = (None, False)
        if authorization_header is not None:  # the receiver's secret: sealed like the keys
            header = self._sealer.seal(authorization_header.encode())
        stream_id = secrets.token_urlsafe(16)
        created = SignalStreamCreated(
            occurred_at=self._clock(),
            client_id=client_id,
            method=method,
            endpoint_url=endpoint_url,
            events_delivered=delivered,
            description=description,
            ip=_text_or_none(meta.get("ip")),
            user_agent=_text_or_none(meta.get("user_agent")),
        )
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            # What is recorded from here on is the stream's; the horizon is before all of it.
            start = self._store.horizon(conn=conn)
            self._store.append(signal_stream(stream_id), 0, [created], meta, conn=conn)
            conn.execute(
                _INSERT,
                (
                    stream_id,
                    client_id,
                    method,
                    endpoint_url,
                    *header,
                    list(delivered),
                    description,
                    start.tx_id,
                    start.position,
                    created.occurred_at,
                ),
            )
        return self.stream(client_id, stream_id)

    def streams(self, client_id: str) -> list[SignalStream]:
        """The client's streams, oldest first."""
        with translated_errors(), self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(_BY_CLIENT, (client_id,)).fetchall()
        return [_stream(row) for row in rows]

    def stream(self, client_id: str, stream_id: str) -> SignalStream:
        """The client's stream; NotFound when it has no such stream (or another client has)."""
        with translated_errors(), self._pool.connection() as conn:
            return _stream(_row(conn, client_id, stream_id, for_update=False))

    def delete(self, client_id: str, stream_id: str, meta: Mapping[str, object]) -> None:
        """Delete the stream: nothing is delivered on it any more."""
        deleted = SignalStreamDeleted(
            occurred_at=self._clock(),
            ip=_text_or_none(meta.get("ip")),
            user_agent=_text_or_none(meta.get("user_agent")),
        )
        with self._locked(client_id, stream_id) as (conn, _):
            self._record(conn, stream_id, deleted, meta)
            conn.execute("DELETE FROM signal_streams WHERE stream_id = %s", (stream_id,))

    def set_status(
        self,
        client_id: str,
        stream_id: str,
        status: str,
        reason: str | None,
        meta: Mapping[str, object],
    ) -> SignalStream:
        """Enable, pause or disable the stream (SSF 1.0 §8.1.2). A paused stream holds what it
        would deliver; a disabled one drops it, and delivers from the ledger's head once
        enabled again."""
        if status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
        _check_text(reason, "reason")
        with self._locked(client_id, stream_id) as (conn, row):
            if (row["status"], row["reason"]) != (status, reason):
                changed = SignalStreamStatusChanged(
                    occurred_at=self._clock(), status=status, reason=reason
                )
                self._record(conn, stream_id, changed, meta)
                cursor, acked = _checkpoint(row), list(row["acked_ahead"])
                if row["status"] == "disabled" and status != "disabled":
                    # A disabled stream held nothing: it resumes at the ledger's head.
                    cursor, acked = max(cursor, self._store.horizon()), []
                conn.execute(_SET_STATUS, (status, reason, *cursor, acked, stream_id))
        return self.stream(client_id, stream_id)

    def request_verification(
        self, client_id: str, stream_id: str, state: str | None, meta: Mapping[str, object]
    ) -> None:
        """Record a verification request; its event is delivered on the stream in its turn."""
        _check_text(state, "state")
        requested = SignalVerificationRequested(occurred_at=self._clock(), state=state)
        with self._locked(client_id, stream_id) as (conn, _):
            self._record(conn, stream_id, requested, meta)

    def poll(
        self,
        client_id: str,
        stream_id: str,
        *,
        max_events: int | None,
        acks: Sequence[str] = (),
        errors: Mapping[str, tuple[str, str | None]] | None = None,
        meta: Mapping[str, object],
    ) -> tuple[dict[str, str], bool]:
        """RFC 8936 §2: take the acknowledgements (`ack`, and `setErrs` as `errors`: jti to err
        and description, each recorded as a SecurityEventRejected), then answer the SETs still
        unacknowledged (at most `max_events`, or MAX_EVENTS) and whether more are available."""
        errors = errors or {}
        if len(acks) + len(errors) > _MAX_ACKS:
            raise InvalidRequest(f"at most {_MAX_ACKS} acknowledgements per poll")
        limit = MAX_EVENTS if max_events is None else min(max_events, MAX_EVENTS)
        with self._locked(client_id, stream_id) as (conn, row):
            stream = _stream(row)
            if stream.method != POLL:
                raise InvalidRequest("this stream delivers by push; it cannot be polled")
            done = {self._acknowledged(stream, jti) for jti in [*acks, *errors]}
            for jti, (err, description) in errors.items():
                _check_text(err, "err")
                _check_text(description, "description")
                rejected = SecurityEventRejected(
                    occurred_at=self._clock(), jti=jti, err=err, description=description
                )
                self._record(conn, stream_id, rejected, meta)
            # Every SET handed out was at or before the horizon: a later "jti" is no SET's.
            horizon = self._store.horizon()
            acked = stream.acked_ahead | {c for c in done if stream.cursor < c <= horizon}
            pending = self.pending(stream, limit, acked, horizon)
            ahead = sorted(c for c in acked if c > pending.clear)
            conn.execute(
                _SET_CURSOR, (*pending.clear, [encode_cursor(c) for c in ahead], stream_id)
            )
        if stream.status != "enabled":
            return {}, False
        return dict(pending.sets), pending.more

    # -- delivery --------------------------------------------------------------------------------

    def pending(
        self,
        stream: SignalStream,
        limit: int,
        acked: frozenset[Checkpoint] | None = None,
        horizon: Checkpoint | None = None,
    ) -> Pending:
        """The stream's next SETs after its cursor, skipping those in `acked` (its own
        acknowledgements ahead of the cursor when None); `horizon`, when the caller read it."""
        due, clear, more = self._due(stream, limit, acked, horizon)
        return Pending([self._set(stream, e) for e in self._with_starts(due)], clear, more)

    def _due(
        self,
        stream: SignalStream,
        limit: int,
        acked: frozenset[Checkpoint] | None,
        horizon: Checkpoint | None,
    ) -> tuple[list[RecordedEvent], Checkpoint, bool]:
        """pending's events, unsigned: the next ones to deliver, how far the cursor may move,
        and whether more wait."""
        acked = stream.acked_ahead if acked is None else acked
        horizon = self._store.horizon() if horizon is None else horizon
        types = [SessionEnded.type_name, SignalVerificationRequested.type_name]
        own = signal_stream(stream.stream_id).id
        wants_ends = SESSION_REVOKED in stream.events_delivered
        after = clear = stream.cursor
        blocked = False
        due: list[RecordedEvent] = []
        while len(due) <= limit:
            page = self._store.read_filtered(after, _PAGE, types=types)
            for recorded in page:
                # Ends for every stream that wants them; a verification only on its own.
                deliver = recorded.stream_id == own or (
                    wants_ends and recorded.type == SessionEnded.type_name
                )
                if deliver and recorded.checkpoint not in acked:
                    blocked = True
                    due.append(recorded)
                    if len(due) > limit:
                        break
                elif not blocked:
                    clear = recorded.checkpoint
            if len(page) < _PAGE:
                if not blocked:
                    clear = max(clear, horizon)
                break
            after = page[-1].checkpoint
        return due[:limit], clear, len(due) > limit

    def signed(self, stream: SignalStream, recorded: RecordedEvent, started: Event | None) -> str:
        """The SET for one event on the stream (RFC 8417, SSF 1.0 §4): iss, aud (the
        receiver), jti (stream and event), iat (the event's time), txn (the ledger event), a
        `sub_id` and one event; never `sub` nor `exp`."""
        event = recorded.event
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": stream.client_id,
            "jti": jti_of(stream.stream_id, recorded.checkpoint),
            "iat": int(recorded.occurred_at.timestamp()),
            "txn": str(recorded.position),
        }
        if isinstance(event, SignalVerificationRequested):
            claims["sub_id"] = {"format": "opaque", "id": stream.stream_id}
            body: dict[str, JsonValue] = {} if event.state is None else {"state": event.state}
            claims["events"] = {VERIFICATION: body}
        else:
            assert isinstance(event, SessionEnded)
            assert isinstance(started, SessionStarted)
            claims["sub_id"] = {
                "format": "complex",
                "session": {"format": "opaque", "id": session_id_of(recorded.stream_id)},
                "user": {"format": "iss_sub", "iss": self.issuer, "sub": started.user},
            }
            claims["events"] = {
                SESSION_REVOKED: {
                    "event_timestamp": int(recorded.occurred_at.timestamp()),
                    "initiating_entity": _INITIATOR.get(event.reason, "admin"),
                    "reason_admin": {"en": event.reason},
                }
            }
        headers = {"typ": SET_TYPE, "kid": self._key.kid}
        return jwt.encode(
            claims, self._key.private_key, algorithm=EVENT_KEY_ALGORITHM, headers=headers
        )

    def push_streams_due(self) -> list[SignalStream]:
        """Enabled push streams whose retry time has come."""
        with translated_errors(), self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            rows = cursor.execute(_PUSH_DUE, (PUSH, self._clock())).fetchall()
        return [_stream(row) for row in rows]

    def authorization_header(self, stream_id: str) -> str | None:
        """The receiver's credential for its push endpoint, unsealed."""
        with translated_errors(), self._pool.connection() as conn:
            row = conn.execute(_HEADER, (stream_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return self._sealer.unseal(bytes(row[0]), bool(row[1])).decode()

    def pushed(self, stream: SignalStream, to: Checkpoint) -> bool:
        """Record that the receiver took everything up to `to`; False when the stream was
        deleted, disabled or paused meanwhile (the pusher stops)."""
        with translated_errors(), self._pool.connection() as conn:
            updated = conn.execute(_PUSHED, (*to, stream.stream_id, *to)).rowcount
        return updated == 1

    def push_refused(
        self, stream: SignalStream, jti: str, at: Checkpoint, err: str, description: str | None
    ) -> bool:
        """The receiver refused one SET with 400 (RFC 8935 §2.4): recorded, and passed."""
        rejected = SecurityEventRejected(
            occurred_at=self._clock(), jti=jti, err=err, description=description
        )
        try:
            with self._locked(stream.client_id, stream.stream_id) as (conn, _):
                self._record(conn, stream.stream_id, rejected, _PUSHER)
        except NotFound:
            return False
        return self.pushed(stream, at)

    def push_failed(self, stream: SignalStream, error: str) -> None:
        """The push did not get through: try again after a back-off (2^failures s, at most a
        minute), keeping the cursor."""
        failures = stream.failures + 1
        retry = self._clock() + timedelta(seconds=min(2**failures, _RETRY_CAP_SECONDS))
        with translated_errors(), self._pool.connection() as conn:
            conn.execute(_PUSH_FAILED, (failures, retry, error[:_MAX_TEXT], stream.stream_id))

    def lags(self) -> list[tuple[SignalStream, float]]:
        """Every stream with the age in seconds of its oldest undelivered SET (0: none, or the
        stream is disabled and holds nothing)."""
        with translated_errors(), self._pool.connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(_ALL).fetchall()
        now = self._clock()
        lags = []
        for stream in map(_stream, rows):
            # Only the event's time is needed: nothing is signed.
            oldest = self._due(stream, 1, None, None)[0] if stream.status != "disabled" else []
            age = (now - oldest[0].occurred_at).total_seconds() if oldest else 0.0
            lags.append((stream, max(0.0, age)))
        return lags

    # -- internals -------------------------------------------------------------------------------

    @contextmanager
    def _locked(
        self, client_id: str, stream_id: str
    ) -> Iterator[tuple[Connection[Any], dict[str, Any]]]:
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            yield conn, _row(conn, client_id, stream_id, for_update=True)

    def _record(
        self, conn: Connection[Any], stream_id: str, event: Event, meta: Mapping[str, object]
    ) -> None:
        # Every writer of the stream holds its row's lock: the version read here stays current.
        stream = signal_stream(stream_id)
        version = self._store.version(stream.id, conn=conn)
        self._store.append(stream, version, [event], meta, conn=conn)

    def _acknowledged(self, stream: SignalStream, jti: str) -> Checkpoint:
        """The checkpoint a jti of this stream stands for; InvalidRequest for any other."""
        at, _, stream_id = jti.partition(".")
        try:
            if stream_id == stream.stream_id:
                return decode_cursor(at)
        except InvalidRequest:
            pass
        raise InvalidRequest(f"{jti[:80]!r} is not the jti of a SET of this stream")

    def _with_starts(
        self, due: list[RecordedEvent]
    ) -> Iterator[tuple[RecordedEvent, Event | None]]:
        ended = {e.stream_id for e in due if isinstance(e.event, SessionEnded)}
        starts = {e.stream_id: e.event for e in self._store.read_first(ended)} if ended else {}
        for recorded in due:
            yield recorded, starts.get(recorded.stream_id)

    def _set(
        self, stream: SignalStream, item: tuple[RecordedEvent, Event | None]
    ) -> tuple[str, str]:
        recorded, started = item
        return jti_of(stream.stream_id, recorded.checkpoint), self.signed(stream, recorded, started)


def jti_of(stream_id: str, at: Checkpoint) -> str:
    """A SET's jti: the event's cursor and the stream, so a redelivery keeps it."""
    return f"{encode_cursor(at)}.{stream_id}"


class Pusher(Periodic):
    """Pushes every enabled push stream's SETs to its receiver (RFC 8935), in order, one SET per
    request; `push_once` for one pass, `start` for a thread that pushes every interval.

    A 202 moves the cursor past the SET; a 400 is the receiver's refusal of that SET, recorded
    and passed; anything else (a 5xx, a timeout, a refused connection) keeps the cursor and
    retries after a back-off, so nothing is lost while a receiver is down.
    """

    def __init__(
        self,
        signals: Signals,
        url: str,
        *,
        role: str | None = None,
        timeout_seconds: float = 5.0,
        interval_seconds: float = 0.5,
    ) -> None:
        super().__init__(interval_seconds, name="signal-pusher", log=_log)
        self._signals = signals
        self._url, self._role = url, role
        self._http = httpx.Client(timeout=timeout_seconds)

    def push_once(self) -> int:
        """Push what is due on every stream this process can lock; the SETs the receivers took."""
        taken = 0
        due = self._signals.push_streams_due()
        if not due:
            return 0
        with translated_errors(), connect(self._url, role=self._role) as conn:
            for stream in due:
                key = (_PUSH_LOCK_CLASS, stream.stream_id)
                locked = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", key)
                if locked.fetchone() != (True,):
                    continue  # another process is pushing it
                try:
                    taken += self._push(stream)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)
        return taken

    def _push(self, stream: SignalStream) -> int:
        # The row again, now that it is ours: another pusher may have moved the cursor.
        try:
            stream = self._signals.stream(stream.client_id, stream.stream_id)
        except NotFound:
            return 0
        if stream.status != "enabled":
            return 0
        pending = self._signals.pending(stream, MAX_EVENTS)
        if not pending.sets:
            if pending.clear != stream.cursor:
                self._signals.pushed(stream, pending.clear)
            return 0
        assert stream.endpoint_url is not None
        headers = {"Content-Type": "application/secevent+jwt", "Accept": "application/json"}
        authorization = self._signals.authorization_header(stream.stream_id)
        if authorization is not None:
            headers["Authorization"] = authorization
        taken = 0
        for jti, token in pending.sets:
            at = decode_cursor(jti.partition(".")[0])
            try:
                response = self._http.post(stream.endpoint_url, content=token, headers=headers)
            except httpx.HTTPError as e:
                self._signals.push_failed(stream, f"{type(e).__name__}: {first_line(e)}")
                return taken
            if response.status_code == 400:
                err, description = _push_error(response)
                if not self._signals.push_refused(stream, jti, at, err, description):
                    return taken
            elif response.status_code in (200, 202):
                if not self._signals.pushed(stream, at):
                    return taken
                taken += 1
            else:
                self._signals.push_failed(stream, f"HTTP {response.status_code}")
                return taken
        return taken

    def one_pass(self) -> int:
        return self.push_once()

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self._http.close()


_PUSHER = {"request_id": "signal-pusher", "user_agent": "session-ledger signal pusher"}
"""The metadata of the pusher's events."""


def _push_error(response: httpx.Response) -> tuple[str, str | None]:
    """RFC 8935 §2.4's error body: `err` and `description`, as far as the receiver gave them."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return "invalid_request", None
    err, description = body.get("err"), body.get("description")
    return (
        err[:_MAX_TEXT] if isinstance(err, str) and err else "invalid_request",
        description[:_MAX_TEXT] if isinstance(description, str) else None,
    )


def _push_endpoint(url: str | None) -> str:
    """A receiver's push endpoint: absolute https without a fragment, or http on loopback."""
    if not url:
        raise InvalidRequest("push delivery needs the receiver's endpoint_url")
    if len(url) > _MAX_TEXT:
        raise InvalidRequest("endpoint_url is too long")
    parts = urlsplit(url)
    if parts.fragment or not parts.hostname:
        raise InvalidRequest("endpoint_url must be an absolute URL without a fragment")
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname)):
        return url
    raise InvalidRequest("endpoint_url must use https (http only on a loopback address)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_text(value: str | None, name: str) -> None:
    if value is not None and len(value) > _MAX_TEXT:
        raise InvalidRequest(f"{name} is longer than {_MAX_TEXT} characters")


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _row(conn: Connection[Any], client_id: str, stream_id: str, *, for_update: bool) -> Any:
    query = _ONE + (" FOR UPDATE" if for_update else "")
    row = conn.cursor(row_factory=dict_row).execute(query, (stream_id, client_id)).fetchone()
    if row is None:
        raise NotFound("no such stream")
    return row


def _checkpoint(row: Mapping[str, Any]) -> Checkpoint:
    return Checkpoint(int(row["cursor_tx_id"]), int(row["cursor_position"]))


def _stream(row: Mapping[str, Any]) -> SignalStream:
    return SignalStream(
        stream_id=row["stream_id"],
        client_id=row["client_id"],
        method=row["method"],
        endpoint_url=row["endpoint_url"],
        events_delivered=tuple(row["events_delivered"]),
        description=row["description"],
        status=row["status"],
        reason=row["reason"],
        cursor=_checkpoint(row),
        acked_ahead=frozenset(decode_cursor(c) for c in row["acked_ahead"]),
        failures=row["failures"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
    )


_COLUMNS = (
    "stream_id, client_id, method, endpoint_url, events_delivered, description, status, reason,"
    " cursor_tx_id, cursor_position, acked_ahead, failures, next_attempt_at, last_error,"
    " created_at"
)
_INSERT = (
    "INSERT INTO signal_streams (stream_id, client_id, method, endpoint_url,"
    " authorization_header, header_sealed, events_delivered, description, status,"
    " cursor_tx_id, cursor_position, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'enabled', %s, %s, %s)"
)
_ONE = f"SELECT {_COLUMNS} FROM signal_streams WHERE stream_id = %s AND client_id = %s"  # noqa: S608
_BY_CLIENT = (
    f"SELECT {_COLUMNS} FROM signal_streams WHERE client_id = %s"  # noqa: S608
    " ORDER BY created_at, stream_id"
)
_ALL = f"SELECT {_COLUMNS} FROM signal_streams ORDER BY created_at, stream_id"  # noqa: S608
_PUSH_DUE = (
    f"SELECT {_COLUMNS} FROM signal_streams"  # noqa: S608
    " WHERE method = %s AND status = 'enabled'"
    " AND (next_attempt_at IS NULL OR next_attempt_at <= %s)"
    " ORDER BY next_attempt_at NULLS FIRST, stream_id"
)
_HEADER = "SELECT authorization_header, header_sealed FROM signal_streams WHERE stream_id = %s"
_SET_STATUS = (
    "UPDATE signal_streams SET status = %s, reason = %s, cursor_tx_id = %s, cursor_position = %s,"
    " acked_ahead = %s, failures = 0, next_attempt_at = NULL WHERE stream_id = %s"
)
_SET_CURSOR = (
    "UPDATE signal_streams SET cursor_tx_id = %s, cursor_position = %s, acked_ahead = %s"
    " WHERE stream_id = %s"
)
# Only forward, and only while the stream still delivers: a status change meanwhile wins.
_PUSHED = (
    "UPDATE signal_streams SET cursor_tx_id = %s, cursor_position = %s, failures = 0,"
    " next_attempt_at = NULL, last_error = NULL"
    " WHERE stream_id = %s AND status = 'enabled'"
    " AND (cursor_tx_id, cursor_position) <= (%s, %s)"
)
_PUSH_FAILED = (
    "UPDATE signal_streams SET failures = %s, next_attempt_at = %s, last_error = %s"
    " WHERE stream_id = %s"
)
