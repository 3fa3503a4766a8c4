"""The token, revocation and introspection endpoints over real HTTP, with the events they append."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Literal

import pytest
from argon2 import PasswordHasher

from tests.api.conftest import PASSWORD, SECRET, LiveServer


def assert_oauth_error(response: object, status: int, error: str) -> None:
    assert getattr(response, "status_code") == status, getattr(response, "text")  # noqa: B009
    headers = getattr(response, "headers")  # noqa: B009
    assert headers["cache-control"] == "no-store"
    body = getattr(response, "json")()  # noqa: B009
    assert body["error"] == error
    assert body["error_description"]


def test_password_login_issues_tokens_and_records_the_start(live: LiveServer) -> None:
    body = live.login(scope="profile")
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 15 * 60
    assert body["scope"] == "profile"
    assert body["refresh_token"]
    assert body["access_token"]
    [started] = live.events("session:")
    assert started.type == "SessionStarted"
    assert started.event.user == "ada"  # type: ignore[attr-defined]
    assert started.metadata["request_id"]
    assert body["refresh_token"] not in started.data_json
    assert PASSWORD not in started.data_json


def test_token_responses_are_not_cached(live: LiveServer) -> None:
    response = live.post(
        "/oauth/token",
        data={
            "grant_type": "password",
            "client_id": "spa",
            "username": "ada",
            "password": PASSWORD,
        },
    )
    assert response.headers["cache-control"] == "no-store"


def test_refresh_rotates_and_the_old_token_is_spent(live: LiveServer) -> None:
    first = live.login()
    live.clock.advance(timedelta(minutes=5))
    response = live.refresh(first["refresh_token"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert live.types() == ["SessionStarted", "RefreshTokenRotated", "ActivityRecorded"]

    live.clock.advance(timedelta(seconds=10))  # the old token again, within the grace window
    retry = live.refresh(first["refresh_token"])
    assert retry.status_code == 200, retry.text
    assert retry.json()["refresh_token"] == second["refresh_token"]
    recorded = ["SessionStarted", "RefreshTokenRotated", "ActivityRecorded", "RefreshTokenRetried"]
    assert live.types() == recorded

    live.clock.advance(timedelta(seconds=1))  # and once the grace window is over
    spent = live.refresh(first["refresh_token"])
    assert_oauth_error(spent, 400, "invalid_grant")
    assert live.types() == [
        *recorded,
        "RefreshTokenReuseDetected",
        "SessionEnded",
    ]
    ended = live.events("session:")[-1].event
    assert ended.reason == "reuse_detected"  # type: ignore[attr-defined]
    assert_oauth_error(live.refresh(second["refresh_token"]), 400, "invalid_grant")
    activity = live.post("/sessions/current/activity", headers=live.bearer(second["access_token"]))
    assert activity.status_code == 401, activity.text


def test_a_retry_in_the_grace_window_gets_the_same_successor(live: LiveServer) -> None:
    first = live.login()
    second = live.refresh(first["refresh_token"]).json()
    live.clock.advance(timedelta(seconds=10))
    retry = live.refresh(first["refresh_token"])
    assert retry.status_code == 200, retry.text
    assert retry.json()["refresh_token"] == second["refresh_token"]
    assert live.types() == ["SessionStarted", "RefreshTokenRotated", "RefreshTokenRetried"]
    assert live.refresh(second["refresh_token"]).status_code == 200


def test_reuse_after_the_grace_window_revokes_the_session(live: LiveServer) -> None:
    first = live.login()
    second = live.refresh(first["refresh_token"]).json()
    live.clock.advance(timedelta(seconds=11))
    stolen = live.refresh(first["refresh_token"])
    assert_oauth_error(stolen, 400, "invalid_grant")
    assert "reuse" in stolen.json()["error_description"]
    assert_oauth_error(live.refresh(second["refresh_token"]), 400, "invalid_grant")
    types = live.types()
    assert types[-2:] == ["RefreshTokenReuseDetected", "SessionEnded"]
    evidence = live.events("session:")[-2].event
    assert evidence.presented_generation == 1  # type: ignore[attr-defined]
    assert evidence.current_generation == 2  # type: ignore[attr-defined]
    assert live.types().count("SessionEnded") == 1


def test_idle_expiry_refuses_the_refresh_and_is_recorded_once(live: LiveServer) -> None:
    first = live.login()
    live.clock.advance(timedelta(minutes=30))
    assert_oauth_error(live.refresh(first["refresh_token"]), 400, "invalid_grant")
    assert_oauth_error(live.refresh(first["refresh_token"]), 400, "invalid_grant")
    ended = live.events("session:")[-1]
    assert ended.type == "SessionEnded"
    assert ended.event.reason == "idle_timeout"  # type: ignore[attr-defined]
    assert live.types().count("SessionEnded") == 1


def test_activity_keeps_a_session_alive_past_the_idle_timeout(live: LiveServer) -> None:
    tokens = live.login()
    for _ in range(3):
        live.clock.advance(timedelta(minutes=14))
        response = live.post(
            "/sessions/current/activity", headers=live.bearer(tokens["access_token"])
        )
        assert response.status_code == 204, response.text
        tokens = live.refresh(tokens["refresh_token"]).json()
    live.clock.advance(timedelta(minutes=29))  # 71 minutes after login, 29 after the last activity
    assert live.refresh(tokens["refresh_token"]).status_code == 200
    assert live.types().count("ActivityRecorded") == 4  # three reports, one refresh; none debounced


def test_activity_reports_are_debounced(live: LiveServer) -> None:
    tokens = live.login()
    headers = live.bearer(tokens["access_token"])
    for _ in range(6):  # reports at 20 s intervals: recorded at 60 s and at 120 s only
        live.clock.advance(timedelta(seconds=20))
        assert live.post("/sessions/current/activity", headers=headers).status_code == 204
    assert live.types() == ["SessionStarted", "ActivityRecorded", "ActivityRecorded"]


def test_absolute_expiry_caps_the_access_token_and_ends_the_session(live: LiveServer) -> None:
    tokens = live.login()
    for minutes in (25, 25, 25, 25, 10):  # never idle; the absolute end is at 120 minutes
        live.clock.advance(timedelta(minutes=minutes))
        response = live.refresh(tokens["refresh_token"])
        assert response.status_code == 200, response.text
        tokens = response.json()
    assert tokens["expires_in"] == 10 * 60  # not 15 minutes: the session ends at 120
    live.clock.advance(timedelta(minutes=10))
    assert_oauth_error(live.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    ended = live.events("session:")[-1]
    assert ended.event.reason == "absolute_timeout"  # type: ignore[attr-defined]


def test_confidential_client_authenticates_with_basic_and_post(live: LiveServer) -> None:
    form = {"grant_type": "password", "username": "ada", "password": PASSWORD}
    basic = live.post("/oauth/token", data=form, auth=("backend", SECRET))
    assert basic.status_code == 200, basic.text
    posted = live.post(
        "/oauth/token", data={**form, "client_id": "backend", "client_secret": SECRET}
    )
    assert posted.status_code == 200, posted.text
    wrong = live.post("/oauth/token", data=form, auth=("backend", "not-the-secret"))
    assert_oauth_error(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    missing = live.post("/oauth/token", data={**form, "client_id": "backend"})
    assert_oauth_error(missing, 401, "invalid_client")


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": "password", "client_id": "spa", "username": "ada"}, 400, "invalid_request"),
        ({"grant_type": "implicit", "client_id": "spa"}, 400, "unsupported_grant_type"),
        (
            {"grant_type": "password", "client_id": "nobody", "username": "ada", "password": "x"},
            401,
            "invalid_client",
        ),
        (
            {
                "grant_type": "password",
                "client_id": "refresh-only",
                "username": "ada",
                "password": PASSWORD,
            },
            400,
            "unauthorized_client",
        ),
        (
            {
                "grant_type": "password",
                "client_id": "spa",
                "username": "ada",
                "password": PASSWORD,
                "scope": "admin",
            },
            400,
            "invalid_scope",
        ),
        (
            {"grant_type": "refresh_token", "client_id": "spa", "refresh_token": "garbage"},
            400,
            "invalid_grant",
        ),
    ],
)
def test_token_errors_follow_rfc_6749(
    live: LiveServer, form: dict[str, str], status: int, error: str
) -> None:
    assert_oauth_error(live.post("/oauth/token", data=form), status, error)
    assert live.types() == []


def test_unknown_user_and_wrong_password_answer_identically(live: LiveServer) -> None:
    def attempt(username: str) -> object:
        form = {"grant_type": "password", "client_id": "spa", "username": username}
        return live.post("/oauth/token", data={**form, "password": "wrong"})

    unknown, wrong = attempt("mallory"), attempt("ada")
    assert (unknown.status_code, unknown.json()) == (wrong.status_code, wrong.json())  # type: ignore[attr-defined]
    failures = [e.event for e in live.events("principal:")]
    assert [f.reason for f in failures] == ["unknown_user", "wrong_password"]  # type: ignore[attr-defined]


class CountingHasher(PasswordHasher):
    """The suite's cheap hasher, counting how many verifications it runs."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified += 1
        return super().verify(hash, password)


def test_unknown_user_costs_the_same_verification_as_a_wrong_password(
    live_factory: Callable[..., LiveServer],
) -> None:
    hasher = CountingHasher()
    live = live_factory(hasher=hasher)

    def verifications(username: str) -> int:
        before = hasher.verified
        form = {"grant_type": "password", "client_id": "spa", "username": username}
        assert_oauth_error(
            live.post("/oauth/token", data={**form, "password": "wrong"}), 400, "invalid_grant"
        )
        return hasher.verified - before

    assert verifications("mallory") == verifications("ada") == 1


def test_five_failures_lock_the_principal(live: LiveServer) -> None:
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": "bad"}
    for _ in range(5):
        live.clock.advance(timedelta(minutes=1))
        assert_oauth_error(live.post("/oauth/token", data=form), 400, "invalid_grant")
    good = {**form, "password": PASSWORD}
    locked = live.post("/oauth/token", data=good)
    assert_oauth_error(locked, 400, "invalid_grant")
    assert "try again later" in locked.json()["error_description"]
    assert live.types("principal:ada")[4:] == ["LoginFailed", "PrincipalLocked", "LoginFailed"]
    live.clock.advance(timedelta(minutes=11))  # the window that began with the first failure
    assert live.post("/oauth/token", data=good).status_code == 200


def test_a_refresh_may_repeat_the_sessions_scope_but_not_change_it(live: LiveServer) -> None:
    tokens = live.login(scope="profile")
    form = {"grant_type": "refresh_token", "client_id": "spa"}
    same = live.post("/oauth/token", data={**form, "refresh_token": tokens["refresh_token"],
                                           "scope": "profile"})  # fmt: skip
    assert same.status_code == 200, same.text
    current = same.json()["refresh_token"]
    for other in ("profile email", "email", ""):
        changed = live.post("/oauth/token", data={**form, "scope": other, "refresh_token": current})
        assert_oauth_error(changed, 400, "invalid_scope")
    assert live.types().count("RefreshTokenRotated") == 1
