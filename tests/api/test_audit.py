"""The audit API and /metrics over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import jwt
import pytest
from psycopg_pool import ConnectionPool

from projections.sql.runner import Runner
from tests.api.conftest import PASSWORD, LiveServer
from tests.waiting import wait_until


@pytest.fixture
def auditor(live: LiveServer) -> dict[str, str]:
    live.accounts.add_user("sec", PASSWORD, ("audit",))
    return live.bearer(live.login(username="sec", scope="audit")["access_token"])


def sid_of(tokens: dict[str, Any]) -> str:
    sid: str = jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"]
    return sid


def run_projections(live: LiveServer, pool: ConnectionPool) -> None:
    Runner(live.settings.database_url or "", pool).run_once()


def test_audit_needs_the_audit_scope(live: LiveServer, auditor: dict[str, str]) -> None:
    ada = live.login()
    anonymous = live.get("/audit/events")
    assert anonymous.status_code == 401
    refused = live.get("/audit/events", headers=live.bearer(ada["access_token"]))
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert refused.json()["error"] == "insufficient_scope"
    assert live.get("/audit/events", headers=auditor).status_code == 200


def test_session_timeline_with_metadata(live: LiveServer, auditor: dict[str, str]) -> None:
    tokens = live.login()
    live.clock.advance(timedelta(minutes=2))
    live.refresh(tokens["refresh_token"])
    response = live.get(f"/audit/sessions/{sid_of(tokens)}/events", headers=auditor)
    assert response.status_code == 200
    events = response.json()["events"]
    assert [e["type"] for e in events] == [
        "SessionStarted",
        "RefreshTokenRotated",
        "ActivityRecorded",
    ]
    assert [e["version"] for e in events] == [1, 2, 3]
    assert events[0]["data"]["user"] == "ada"
    assert events[1]["metadata"]["client_id"] == "spa"
    assert events[1]["occurred_at"] == "2026-03-01T09:02:00.000000Z"
    assert live.get("/audit/sessions/nope/events", headers=auditor).status_code == 404


def test_session_as_of(live: LiveServer, auditor: dict[str, str]) -> None:
    tokens = live.login()
    sid = sid_of(tokens)
    live.clock.advance(timedelta(minutes=10))
    live.post("/oauth/revoke", data={"token": tokens["refresh_token"], "client_id": "spa"})

    def at(time: str) -> dict[str, Any]:
        response = live.get(f"/audit/sessions/{sid}", params={"as_of": time}, headers=auditor)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    assert at("2026-03-01T08:59:00Z")["status"] == "not_started"
    during = at("2026-03-01T09:05:00Z")
    assert (during["status"], during["valid"], during["idle_seconds"]) == ("valid", True, 300)
    assert at("2026-03-01T09:11:00Z")["end_reason"] == "logout"
    assert at("2026-03-01T09:11:00Z")["valid"] is False
    bad = live.get(f"/audit/sessions/{sid}", params={"as_of": "yesterday"}, headers=auditor)
    assert bad.status_code == 400


def test_users_sessions(live: LiveServer, auditor: dict[str, str]) -> None:
    live.login()
    live.login()
    live.login(username="bob")
    sessions = live.get("/audit/users/ada/sessions", headers=auditor).json()["sessions"]
    assert len(sessions) == 2
    assert {s["user"] for s in sessions} == {"ada"}
    assert {s["status"] for s in sessions} == {"valid"}


def test_a_recorded_expiry_reads_the_same_in_both_audit_views(live: LiveServer) -> None:
    tokens = live.login()
    live.clock.advance(timedelta(minutes=31))  # past the 30 min idle timeout
    assert live.refresh(tokens["refresh_token"]).status_code == 400  # records the expiry
    live.accounts.add_user("sec", PASSWORD, ("audit",))
    auditor = live.bearer(live.login(username="sec", scope="audit")["access_token"])
    listed = live.get("/audit/users/ada/sessions", headers=auditor).json()["sessions"]
    one = live.get(f"/audit/sessions/{sid_of(tokens)}", headers=auditor).json()
    assert [s["status"] for s in listed] == [one["status"]] == ["idle_timeout"]


def test_event_paging_returns_every_event_once_while_events_are_appended(
    live: LiveServer, auditor: dict[str, str]
) -> None:
    for _ in range(3):
        live.login()
    seen: list[int] = []
    cursor = None
    for page in range(20):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["after"] = cursor
        body = live.get("/audit/events", params=params, headers=auditor).json()
        seen += [e["position"] for e in body["events"]]
        cursor = body["next"]
        if page < 5:
            live.login(username="bob")  # more events arrive while the auditor pages
        if not body["events"] and page >= 5:
            break
    every = [e.position for e in live.events()]
    assert sorted(seen) == sorted(every)
    assert len(seen) == len(set(seen))


def test_event_filters(live: LiveServer, auditor: dict[str, str]) -> None:
    live.login()
    live.clock.advance(timedelta(hours=1))
    bob = live.login(username="bob")
    live.refresh(bob["refresh_token"])
    auditor = live.bearer(live.login(username="sec", scope="audit")["access_token"])

    def query(**params: str) -> list[dict[str, Any]]:
        response = live.get("/audit/events", params=params, headers=auditor)
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    assert {e["type"] for e in query(type="RefreshTokenRotated")} == {"RefreshTokenRotated"}
    assert {e["stream_id"] for e in query(user="bob")} == {f"session:{sid_of(bob)}"}
    later = query(**{"from": "2026-03-01T09:30:00Z"})
    assert all(e["occurred_at"] >= "2026-03-01T09:30" for e in later)
    assert [e["type"] for e in later].count("SessionStarted") == 2  # bob's and the auditor's
    assert len(query(to="2026-03-01T09:30:00Z")) == 2  # ada's and the auditor's first starts
    unknown = live.get("/audit/events", params={"type": "Nope"}, headers=auditor)
    assert unknown.status_code == 400
    assert "Nope" in unknown.json()["error_description"]
    too_many = live.get("/audit/events", params={"limit": 5000}, headers=auditor)
    assert too_many.status_code == 400
    bad_cursor = live.get("/audit/events", params={"after": "%%%"}, headers=auditor)
    assert bad_cursor.status_code == 400


def test_alerts_after_reuse_and_lockout(
    live: LiveServer, auditor: dict[str, str], pool: ConnectionPool
) -> None:
    tokens = live.login()
    live.refresh(tokens["refresh_token"])
    live.clock.advance(timedelta(minutes=1))
    live.refresh(tokens["refresh_token"])  # stolen: reuse detected
    bad = {"grant_type": "password", "client_id": "spa", "username": "bob", "password": "no"}
    for _ in range(5):
        live.post("/oauth/token", data=bad)
    run_projections(live, pool)
    page = live.get("/audit/alerts", headers=auditor).json()
    alerts = page["alerts"]
    assert [a["kind"] for a in alerts] == ["reuse_detected", "lockout"]
    assert page["next"] == alerts[-1]["position"]
    first = live.get("/audit/alerts", params={"limit": 1}, headers=auditor).json()
    rest = live.get("/audit/alerts", params={"after": first["next"]}, headers=auditor).json()
    assert first["alerts"] + rest["alerts"] == alerts
    past = live.get("/audit/alerts", params={"after": page["next"]}, headers=auditor).json()
    assert past == {"alerts": [], "next": page["next"]}
    assert alerts[0]["session_id"] == sid_of(tokens)
    assert alerts[0]["details"]["presented_generation"] == 1
    assert alerts[1]["user_name"] == "bob"


def test_metrics(live: LiveServer, pool: ConnectionPool) -> None:
    tokens = live.login()
    live.refresh(tokens["refresh_token"])
    live.post("/oauth/token", data={"grant_type": "password", "client_id": "spa",
                                    "username": "ada", "password": "no"})  # fmt: skip
    run_projections(live, pool)
    response = live.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "session_ledger_logins_total 1" in text
    assert "session_ledger_login_failures_total 1" in text
    assert "session_ledger_refreshes_total 1" in text
    assert 'session_ledger_projection_lag_events{projection="hourly_stats"} 0' in text
    # prometheus_client writes labels in alphabetical order
    assert 'le="+Inf",method="POST",route="/oauth/token",status="2xx"} 2.0' in text


def test_the_server_keeps_catch_up_projections_current_by_itself(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(run_projections=True)
    live.login()
    # The runner wakes on NOTIFY; wait (bounded) for it instead of running it from the test.
    wait_until(
        lambda: "session_ledger_logins_total 1" in live.get("/metrics").text,
        timeout=20,
        what="the server's runner to apply the login",
    )
