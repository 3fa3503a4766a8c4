"""Limits on hostile input, each at its edge: body size, field count and length, request target
and headers, and the bounded `limit` of every listing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import requests

from api.http.edge import MAX_HEADER_BYTES, MAX_HEADERS, MAX_TARGET_BYTES
from api.http.forms import MAX_BODY_BYTES, MAX_FIELD_CHARS, MAX_FIELDS
from api.ratelimit import RateLimit
from tests.api.conftest import PASSWORD, LiveServer
from tests.api.test_audit import sid_of
from tests.api.test_browser_endpoints import HEADERS

TOKEN_FORM = {"grant_type": "password", "client_id": "spa", "username": "ada"}


def assert_refused(response: requests.Response, status: int, description: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == "invalid_request"
    assert description in response.json()["error_description"]
    assert response.headers["Cache-Control"] == "no-store"


def _token(live: LiveServer, **fields: str) -> requests.Response:
    return live.post("/oauth/token", data={**TOKEN_FORM, "password": PASSWORD, **fields})


def _padded(form: dict[str, str], size: int) -> str:
    """The form, url-encoded, with unknown fields (which are ignored) making it `size` bytes."""
    text = "&".join(f"{k}={v}" for k, v in form.items())
    for i in range(MAX_FIELDS - len(form)):
        if len(text) == size:
            break
        room = min(size - len(text) - len(f"&p{i}="), MAX_FIELD_CHARS)
        text += f"&p{i}=" + "x" * room
    assert len(text) == size
    return text


def test_a_body_past_the_limit_is_refused_and_one_at_it_is_read(live: LiveServer) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    form = {**TOKEN_FORM, "password": PASSWORD}
    at_limit = live.post("/oauth/token", data=_padded(form, MAX_BODY_BYTES), headers=headers)
    assert at_limit.status_code == 200
    over = live.post("/oauth/token", data=_padded(form, MAX_BODY_BYTES + 1), headers=headers)
    assert_refused(over, 400, f"exceeds {MAX_BODY_BYTES} bytes")


def test_a_browser_body_past_the_limit_is_refused(live: LiveServer) -> None:
    body = {"client_id": "spa", "username": "ada", "password": "x" * MAX_BODY_BYTES}
    response = live.post("/browser/login", json=body, headers=HEADERS)
    assert_refused(response, 400, f"exceeds {MAX_BODY_BYTES} bytes")


def test_a_body_sent_in_chunks_is_refused_once_it_passes_the_limit(live: LiveServer) -> None:
    chunks = (b"a" * 1024 for _ in range(MAX_BODY_BYTES // 1024 + 8))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = live.post("/oauth/token", data=chunks, headers=headers)
    assert_refused(response, 400, "exceeds")


def test_fields_past_their_length_or_count_are_refused(live: LiveServer) -> None:
    at_limit = _token(live, scope="p" * MAX_FIELD_CHARS)  # read, and refused for its meaning
    assert (at_limit.status_code, at_limit.json()["error"]) == (400, "invalid_scope")
    assert_refused(_token(live, scope="p" * (MAX_FIELD_CHARS + 1)), 400, "too long")
    assert_refused(_token(live, **{"n" * 65: "v"}), 400, "too long")
    extra = {f"f{i}": "v" for i in range(MAX_FIELDS - len(TOKEN_FORM) - 1)}
    assert _token(live, **extra).status_code == 200
    assert_refused(_token(live, **extra, one_more="v"), 400, f"more than {MAX_FIELDS} parameters")


def test_an_oversized_request_target_is_414(live: LiveServer) -> None:
    response = live.get("/healthz", params={"q": "x" * MAX_TARGET_BYTES})
    assert_refused(response, 414, f"exceeds {MAX_TARGET_BYTES} bytes")


def test_oversized_or_too_many_headers_are_431(live: LiveServer) -> None:
    big = live.get("/healthz", headers={"X-Padding": "x" * MAX_HEADER_BYTES})
    assert_refused(big, 431, f"exceed {MAX_HEADER_BYTES} bytes")
    many = live.get("/healthz", headers={f"X-H{i}": "v" for i in range(MAX_HEADERS)})
    assert_refused(many, 431, f"more than {MAX_HEADERS} request headers")
    usual = live.get("/healthz", headers={f"X-H{i}": "v" for i in range(20)})
    assert usual.status_code == 200


LISTINGS = [
    "/audit/events",
    "/audit/alerts",
    "/audit/users/ada/sessions",
    "/audit/sessions/{sid}/events",
]


@pytest.fixture
def auditor_of(live: LiveServer) -> tuple[dict[str, str], dict[str, Any]]:
    live.accounts.add_user("sec", PASSWORD, ("audit",))
    auditor = live.bearer(live.login(username="sec", scope="audit")["access_token"])
    return auditor, live.login()


@pytest.mark.parametrize("path", LISTINGS)
@pytest.mark.parametrize("limit", ["0", "1001", "-1", "many", "99999999999999999999"])
def test_every_listing_refuses_a_limit_outside_1_to_1000(
    live: LiveServer, auditor_of: tuple[dict[str, str], dict[str, Any]], path: str, limit: str
) -> None:
    auditor, ada = auditor_of
    url = path.format(sid=sid_of(ada))
    assert_refused(live.get(url, params={"limit": limit}, headers=auditor), 400, "malformed")
    assert live.get(url, params={"limit": "1000"}, headers=auditor).status_code == 200


def test_a_sessions_timeline_pages_by_version(
    live: LiveServer, auditor_of: tuple[dict[str, str], dict[str, Any]]
) -> None:
    auditor, ada = auditor_of
    live.clock.advance(timedelta(minutes=2))
    assert live.refresh(ada["refresh_token"]).status_code == 200  # versions 2 and 3
    path = f"/audit/sessions/{sid_of(ada)}/events"

    def page(**params: object) -> tuple[list[int], int]:
        body = live.get(path, params=params, headers=auditor).json()
        return [e["version"] for e in body["events"]], body["next"]

    assert page() == ([1, 2, 3], 3)
    assert page(limit=2) == ([1, 2], 2)
    assert page(limit=2, after=2) == ([3], 3)
    assert page(after=3) == ([], 3)
    for after in ("-1", "2147483648", "x"):
        response = live.get(path, params={"after": after}, headers=auditor)
        assert_refused(response, 400, "malformed")


def test_a_users_own_listing_shows_at_most_100_sessions(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(address_logins=RateLimit(limit=200))
    tokens = []
    for _ in range(101):
        tokens.append(live.login())
        live.clock.advance(timedelta(seconds=1))
    sessions = live.get("/sessions", headers=live.bearer(tokens[-1]["access_token"]))
    listed = [s["id"] for s in sessions.json()["sessions"]]
    assert len(listed) == 100
    assert sid_of(tokens[-1]) in listed  # newest first: the oldest is the one left out
    assert sid_of(tokens[0]) not in listed
