"""The streams sessions live in: their types, how their ids are made and read back.

A stream id is `<type>:<key>` (`session:<session id>`, `principal:<user name>`,
`client:<client id>`, `browser-refusal:<request id>`, `signal-stream:<SSF stream id>`,
`authorization-code:<the code's SHA-256, hex>`). Stored
ids keep this form for good: changing it would orphan every stream already written.
"""

from __future__ import annotations

from ledger.records import RecordedEvent, Stream

SESSION = "session"
"""The stream type of a session's events (one stream per session)."""
PRINCIPAL = "principal"
"""The stream type of a user name's failed logins and locks (one stream per name)."""
CLIENT = "client"
"""The stream type of a client id's failed authentications and locks (one stream per id)."""
BROWSER_REFUSAL = "browser-refusal"
"""The stream type of a refused cross-site browser request (one stream per request)."""
SIGNAL_STREAM = "signal-stream"
"""The stream type of a Shared Signals event stream's history (one stream per SSF stream)."""
AUTHORIZATION_CODE = "authorization-code"
"""The stream type of an authorization code's life: issued, refused, redeemed, replayed."""


def session_stream(session_id: str) -> Stream:
    """The stream of the session `session_id`."""
    return Stream(_stream_id(SESSION, session_id), SESSION)


def principal_stream(name: str) -> Stream:
    """The stream of the user name `name`'s failed logins and locks."""
    return Stream(_stream_id(PRINCIPAL, name), PRINCIPAL)


def client_stream(client_id: str) -> Stream:
    """The stream of the client id `client_id`'s failed authentications and locks."""
    return Stream(_stream_id(CLIENT, client_id), CLIENT)


def refusal_stream(request_id: str) -> Stream:
    """The stream recording that the browser request `request_id` was refused."""
    return Stream(_stream_id(BROWSER_REFUSAL, request_id), BROWSER_REFUSAL)


def signal_stream(stream_id: str) -> Stream:
    """The stream recording the Shared Signals stream `stream_id`'s history."""
    return Stream(_stream_id(SIGNAL_STREAM, stream_id), SIGNAL_STREAM)


def code_stream(code_hash: str) -> Stream:
    """The stream of the authorization code whose SHA-256 (hex) is `code_hash`."""
    return Stream(_stream_id(AUTHORIZATION_CODE, code_hash), AUTHORIZATION_CODE)


def session_stream_id(session_id: str) -> str:
    """The id of the session `session_id`'s stream."""
    return _stream_id(SESSION, session_id)


def principal_stream_id(name: str) -> str:
    """The id of the user name `name`'s stream."""
    return _stream_id(PRINCIPAL, name)


def session_id_of(stream_id: str) -> str:
    """The session id a session stream's id names; ValueError for any other stream."""
    return key_of(SESSION, stream_id)


def principal_name_of(stream_id: str) -> str:
    """The user name a principal stream's id names; ValueError for any other stream."""
    return key_of(PRINCIPAL, stream_id)


def client_id_of(stream_id: str) -> str:
    """The client id a client stream's id names; ValueError for any other stream."""
    return key_of(CLIENT, stream_id)


def is_session(recorded: RecordedEvent) -> bool:
    """Whether the event belongs to a session's stream."""
    return recorded.stream_type == SESSION


def is_principal(recorded: RecordedEvent) -> bool:
    """Whether the event belongs to a principal's stream."""
    return recorded.stream_type == PRINCIPAL


def _stream_id(stream_type: str, key: str) -> str:
    return f"{stream_type}:{key}"


def key_of(stream_type: str, stream_id: str) -> str:
    """The key a stream of `stream_type` is named by; ValueError for a stream of another type."""
    prefix = f"{stream_type}:"
    if not stream_id.startswith(prefix):
        raise ValueError(f"{stream_id!r} is not a {stream_type} stream id")
    return stream_id[len(prefix) :]
