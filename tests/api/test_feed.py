"""GET /feeds/session-ends: JSON pages and server-sent events of every session end, resumable by
cursor with nothing skipped or repeated, for readers holding sessions:read."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import requests

from api.cursors import encode_cursor
from ledger.records import START
from tests.api.conftest import (
    RS_SECRET,
    SECRET,
    LiveServer,
    add_resource_server,
    end_three_ways,
    sid,
)

OLD_START: dict[str, object] = {
    "user": "ada", "client_id": "spa", "scope": [], "refresh_token_hash": "ab" * 32,
    "ip": None, "user_agent": None,
}  # fmt: skip
JSON = {"Accept": "application/json"}
EVENTS = {"Accept": "text/event-stream"}


@pytest.fixture
def rs(live: LiveServer) -> LiveServer:
    add_resource_server(live.accounts)
    return live


def _rs_token(live: LiveServer) -> dict[str, str]:
    response = live.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=("rs", RS_SECRET)
    )
    return live.bearer(response.json()["access_token"])


def _page(live: LiveServer, **params: Any) -> dict[str, Any]:
    response = live.get("/feeds/session-ends", params=params, headers={**JSON, **_rs_token(live)})
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


def test_a_page_lists_every_end_with_its_session_user_and_client(rs: LiveServer) -> None:
    ended = end_three_ways(rs)
    body = _page(rs)
    assert [(e["sid"], e["reason"]) for e in body["events"]] == ended
    first = body["events"][0]
    assert (first["sub"], first["client_id"]) == ("ada", "spa")
    assert body["events"][1]["sub"] == "bob"
    assert first["ended_at"].endswith("Z")
    assert body["next"] == body["events"][-1]["cursor"]
    assert _page(rs, after=body["next"]) == {"events": [], "next": body["next"]}


def test_pages_of_one_resume_with_nothing_skipped_or_repeated(rs: LiveServer) -> None:
    ended = end_three_ways(rs)
    seen, cursor = [], None
    for _ in range(4):
        body = _page(rs, limit=1, **({} if cursor is None else {"after": cursor}))
        seen += [(e["sid"], e["reason"]) for e in body["events"]]
        cursor = body["next"]
    assert seen == ended


def test_without_a_cursor_only_ends_recorded_within_a_token_lifetime_are_listed(
    rs: LiveServer, db_url: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:  # a session that ended an hour ago
        for version, (kind, data) in enumerate(
            [("SessionStarted", OLD_START), ("SessionEnded", {"reason": "logout"})], 1
        ):
            conn.execute(
                "INSERT INTO events (stream_id, stream_type, version, type, schema_version,"
                " data, metadata, occurred_at, recorded_at, prev_hash, hash)"
                " VALUES ('session:old', 'session', %s, %s, 1, %s, '{}', now() - interval '1h',"
                " now() - interval '1h', %s, %s)",
                (version, kind, json.dumps(data), bytes(32), bytes(32)),
            )
    ended = end_three_ways(rs)
    assert [(e["sid"], e["reason"]) for e in _page(rs)["events"]] == ended
    everything = _page(rs, after=encode_cursor(START))["events"]
    assert [e["sid"] for e in everything] == ["old", *(sid for sid, _ in ended)]


@pytest.mark.parametrize("cursor", ["not-a-cursor", "A" * 65, "MTp4", "LTE6MQ"])
def test_a_malformed_cursor_is_a_400(rs: LiveServer, cursor: str) -> None:
    response = rs.get(
        "/feeds/session-ends", params={"after": cursor}, headers={**JSON, **_rs_token(rs)}
    )
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "error_description": "malformed cursor"}


def test_readers_without_sessions_read_are_refused_as_rfc_6750_says(rs: LiveServer) -> None:
    anonymous = rs.get("/feeds/session-ends", headers=JSON)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer ")
    user = rs.get("/feeds/session-ends", headers={**JSON, **rs.bearer(rs.login()["access_token"])})
    assert (user.status_code, user.json()["error"]) == (403, "insufficient_scope")
    assert 'error="insufficient_scope"' in user.headers["WWW-Authenticate"]
    basic = rs.get("/feeds/session-ends", headers=JSON, auth=("rs", RS_SECRET))
    assert basic.status_code == 200
    unscoped = rs.get("/feeds/session-ends", headers=JSON, auth=("backend", SECRET))
    assert (unscoped.status_code, unscoped.json()["error"]) == (403, "insufficient_scope")
    wrong = rs.get("/feeds/session-ends", headers=JSON, auth=("rs", "not-the-secret"))
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    forged = rs.get("/feeds/session-ends", headers={**JSON, **rs.bearer("x.y.z")})
    assert (forged.status_code, forged.json()["error"]) == (401, "invalid_token")


# -- server-sent events -------------------------------------------------------------------------


class EventStream:
    """An open text/event-stream response read on a thread: events and heartbeats by arrival."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        self.items: queue.Queue[dict[str, str] | str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line.startswith(":"):
                    self.items.put(line)
                elif line == "":
                    if "data" in fields:
                        self.items.put(fields)
                    fields = {}
                else:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except Exception:  # closing the response ends the read either way
            pass
        self.items.put(None)

    def next_event(self, timeout: float = 10.0) -> dict[str, str]:
        """The next event (heartbeats skipped); AssertionError after `timeout` s."""
        while True:
            item = self.items.get(timeout=timeout)
            assert item is not None, "the stream ended"
            if isinstance(item, dict):
                return item

    def next_heartbeat(self, timeout: float = 10.0) -> str:
        item = self.items.get(timeout=timeout)
        assert isinstance(item, str), item
        return item


@contextmanager
def _stream(
    live: LiveServer, headers: dict[str, str] | None = None, **params: str
) -> Iterator[EventStream]:
    response = requests.get(
        live.url + "/feeds/session-ends",
        params=params,
        headers={**EVENTS, **(headers or _rs_token(live))},
        stream=True,
        timeout=(10, 10),
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    try:
        yield EventStream(response)
    finally:
        response.close()


def test_a_stream_begins_with_recent_ends_and_pushes_each_new_one(rs: LiveServer) -> None:
    before = rs.login()
    rs.delete(f"/sessions/{sid(before)}", headers=rs.bearer(before["access_token"]))
    with _stream(rs) as stream:
        first = stream.next_event()
        assert json.loads(first["data"])["sid"] == sid(before)
        later = rs.login(username="bob")
        rs.delete("/sessions", headers=rs.bearer(later["access_token"]))
        pushed = json.loads(stream.next_event()["data"])
        assert (pushed["sid"], pushed["sub"], pushed["reason"]) == (sid(later), "bob", "logout")


def test_last_event_id_resumes_after_the_last_event_seen(rs: LiveServer) -> None:
    ended = end_three_ways(rs)
    with _stream(rs) as stream:
        first = stream.next_event()
    with _stream(rs, headers={"Last-Event-ID": first["id"], **_rs_token(rs)}) as resumed:
        rest = [json.loads(resumed.next_event()["data"]) for _ in range(2)]
    assert [(e["sid"], e["reason"]) for e in rest] == ended[1:]
    with _stream(rs, after=first["id"]) as by_query:
        assert json.loads(by_query.next_event()["data"])["sid"] == ended[1][0]


def test_a_quiet_stream_sends_heartbeats(rs: LiveServer) -> None:
    with _stream(rs) as stream:  # the test server's heartbeat is 1 s
        assert stream.next_heartbeat(timeout=5) == ": heartbeat"


def test_many_subscribers_share_one_listener_and_the_pool(
    live_factory: Callable[..., LiveServer], db_url: str
) -> None:
    live = live_factory()
    add_resource_server(live.accounts)

    def connections() -> int:
        with psycopg.connect(db_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            ).fetchone()
        return int(row[0]) if row else 0

    with _stream(live) as one:
        one.next_heartbeat()
        with_one = connections()
        token = _rs_token(live)
        streams = [_stream(live, headers=token) for _ in range(30)]
        opened = [s.__enter__() for s in streams]
        try:
            tokens = live.login()
            live.delete(f"/sessions/{sid(tokens)}", headers=live.bearer(tokens["access_token"]))
            for stream in [one, *opened]:
                assert json.loads(stream.next_event()["data"])["sid"] == sid(tokens)
            assert connections() <= with_one + 2  # the pools may open a spare; no more
        finally:
            for s in streams:
                s.__exit__(None, None, None)
