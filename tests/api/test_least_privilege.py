"""Least privilege in practice: the running server acts as the runtime role, that role cannot
change the event log even with its trigger disabled, and no HTTP route gives out a password or
secret hash."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from api.accounts import Accounts
from api.http.app import create_app
from api.settings import Settings
from ledger.clock import ManualClock
from ledger.db import RUNTIME_ROLE, SCHEMA_VERSION, apply_schema, check_role
from ledger.errors import StorageError
from tests.api.conftest import CHEAP_HASHER, PASSWORD, SECRET, LiveServer, serve_in_thread
from tests.api.test_audit import sid_of

Admin = psycopg.Connection[tuple[Any, ...]]


def test_the_server_acts_as_the_runtime_role(live: LiveServer) -> None:
    with live.app.state.pool.connection() as conn:
        assert conn.execute("SELECT current_user").fetchone() == (RUNTIME_ROLE,)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET type = 'SessionEnded'",
        "DELETE FROM events",
        "TRUNCATE events",
        "ALTER TABLE events ENABLE TRIGGER USER",
        "UPDATE users SET password_hash = 'x'",
        "DELETE FROM users",
    ],
)
def test_the_servers_connections_cannot_change_history_even_without_the_trigger(
    live: LiveServer, admin: Admin, statement: str
) -> None:
    live.login()
    before = admin.execute("SELECT stream_id, version, type, hash FROM events").fetchall()
    admin.execute("ALTER TABLE events DISABLE TRIGGER USER")
    with (
        live.app.state.pool.connection() as conn,
        pytest.raises(pg_errors.InsufficientPrivilege),
    ):
        conn.execute(statement)
    assert admin.execute("SELECT stream_id, version, type, hash FROM events").fetchall() == before


@pytest.fixture
def outsider(admin: Admin, db_url: str) -> Iterator[tuple[str, str]]:
    """A login role that is not a member of the runtime role, and a URL that connects as it."""
    name = f"outsider_{uuid.uuid4().hex[:10]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name, make_conninfo(db_url, user=name)
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_login_role_outside_the_runtime_role_is_refused_saying_what_to_grant(
    admin: Admin, outsider: tuple[str, str]
) -> None:
    name, url = outsider
    with pytest.raises(StorageError, match=f"GRANT {RUNTIME_ROLE} TO"):
        check_role(url, RUNTIME_ROLE)
    with pytest.raises(StorageError, match="role no_such_role does not exist; as a superuser"):
        check_role(url, "no_such_role")
    admin.execute(sql.SQL("GRANT {} TO {}").format(*map(sql.Identifier, (RUNTIME_ROLE, name))))
    check_role(url, RUNTIME_ROLE)


@pytest.fixture
def runtime_login(admin: Admin, outsider: tuple[str, str]) -> str:
    """The URL of a login that holds the runtime role and nothing else: production's setup."""
    name, url = outsider
    admin.execute(sql.SQL("GRANT {} TO {}").format(*map(sql.Identifier, (RUNTIME_ROLE, name))))
    return url


def test_a_login_holding_only_the_runtime_role_runs_the_service(
    runtime_login: str, accounts: Accounts, clock: ManualClock
) -> None:
    apply_schema(runtime_login)  # may not apply it, but it is current: goes on
    check_role(runtime_login, RUNTIME_ROLE)
    settings = Settings(database_url=runtime_login, issuer="https://ledger.test")
    app = create_app(settings, runtime_login, clock=clock, hasher=CHEAP_HASHER)
    url, stop = serve_in_thread(app)
    try:
        form = {"grant_type": "password", "client_id": "spa", "username": "ada"}
        login = requests.post(f"{url}/oauth/token", data={**form, "password": PASSWORD}, timeout=30)
        assert login.status_code == 200, login.text
        refresh = {"grant_type": "refresh_token", "client_id": "spa"}
        refreshed = requests.post(
            f"{url}/oauth/token",
            data={**refresh, "refresh_token": login.json()["refresh_token"]},
            timeout=30,
        )
        assert refreshed.status_code == 200, refreshed.text
    finally:
        stop()


def test_a_login_that_may_not_apply_an_outdated_schema_is_told_how(
    runtime_login: str, admin: Admin
) -> None:
    admin.execute("DELETE FROM schema_version WHERE version = %s", (SCHEMA_VERSION,))
    with pytest.raises(StorageError, match=r"may not apply it .*session-ledger db init"):
        apply_schema(runtime_login)


def _stored_hashes(admin: Admin) -> list[str]:
    users = admin.execute("SELECT password_hash FROM users").fetchall()
    clients = admin.execute("SELECT secret_hash FROM clients WHERE secret_hash IS NOT NULL")
    return [row[0] for row in [*users, *clients.fetchall()]]


def test_no_route_answers_with_a_password_or_secret_hash(
    live: LiveServer, accounts: Accounts, admin: Admin
) -> None:
    accounts.add_user("sec", PASSWORD, ("audit",))
    auditor = live.bearer(live.login(username="sec", scope="audit")["access_token"])
    ada = live.login()
    wrong = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": "x"}
    assert live.post("/oauth/token", data=wrong).status_code == 400  # a LoginFailed to show
    sid, backend = sid_of(ada), ("backend", SECRET)
    responses = [
        live.get(path, headers=auditor)
        for path in (
            "/.well-known/oauth-authorization-server",
            "/.well-known/jwks.json",
            "/sessions",
            f"/audit/sessions/{sid}/events",
            f"/audit/sessions/{sid}",
            "/audit/users/ada/sessions",
            "/audit/users/sec/sessions",
            "/audit/events?limit=1000",
            "/audit/alerts",
            "/metrics",
            "/healthz",
        )
    ]
    responses.append(
        live.post("/oauth/introspect", data={"token": ada["refresh_token"]}, auth=backend)
    )
    responses.append(
        live.post("/oauth/introspect", data={"token": ada["access_token"]}, auth=backend)
    )
    responses.append(live.refresh(ada["refresh_token"]))
    assert [r.status_code for r in responses] == [200] * len(responses)

    hashes = _stored_hashes(admin)
    assert len(hashes) == 4  # ada, bob, sec and the backend client
    assert sorted(h.split("$")[0] or h.split("$")[1] for h in hashes) == [
        "argon2id",
        "argon2id",
        "argon2id",
        "hmac-sha256",
    ]
    for response in responses:
        assert "$argon2" not in response.text, response.url
        assert "hmac-sha256$" not in response.text, response.url
        assert PASSWORD not in response.text, response.url
        assert SECRET not in response.text, response.url
        assert all(h.split("$")[-1] not in response.text for h in hashes), response.url
