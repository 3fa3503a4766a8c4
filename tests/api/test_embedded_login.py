"""On the embedded default `serve` logs in as a role that holds only the runtime role, never as
the superuser that owns the data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from ledger.db import LOGIN_ROLE, RUNTIME_ROLE
from ledger.embedded import running_url, start_embedded, stop_embedded
from tests.api.test_cli import run
from tests.api.test_serve import serving

# What a role holds besides its memberships: none of these may be true for the service's login.
POWERS = "rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"


def _powers(conn: psycopg.Connection[tuple[object, ...]], role: str) -> dict[str, object]:
    row = conn.execute(f"SELECT {POWERS} FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    assert row is not None, f"role {role} does not exist"
    return dict(zip(POWERS.split(", "), row, strict=True))


def _memberships(conn: psycopg.Connection[tuple[object, ...]], role: str) -> list[object]:
    rows = conn.execute(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        " WHERE m.member = %s::regrole ORDER BY 1",
        (role,),
    ).fetchall()
    return [name for (name,) in rows]


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A superuser connection to an embedded server in a new data directory, kept running."""
    data_dir = tmp_path / "pgdata"
    with psycopg.connect(start_embedded(data_dir, keep_running=True), autocommit=True) as conn:
        yield conn
    stop_embedded(data_dir)


@pytest.mark.slow
def test_serve_on_the_embedded_default_logs_in_as_a_role_with_no_powers(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    with serving("--demo", env={"LEDGER_DATA_DIR": str(data_dir)}) as (url, _):
        form = {"grant_type": "password", "client_id": "demo-spa", "username": "demo"}
        login = requests.post(
            f"{url}/oauth/token", data={**form, "password": "demo-password"}, timeout=30
        )
        assert login.status_code == 200, login.text
        owner_url = running_url(data_dir)
        assert owner_url is not None
        with psycopg.connect(owner_url, autocommit=True) as conn:
            logins = conn.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
            assert logins == [(LOGIN_ROLE,)]  # the workers' pools and projection runners
            assert not any(_powers(conn, LOGIN_ROLE).values())
            assert _memberships(conn, LOGIN_ROLE) == [RUNTIME_ROLE]


@pytest.mark.slow
def test_db_init_takes_back_what_was_granted_to_the_login_by_hand(
    tmp_path: Path, owner: psycopg.Connection[tuple[object, ...]]
) -> None:
    env = {"LEDGER_DATA_DIR": str(tmp_path / "pgdata")}
    first = run("db", "init", env=env)
    assert first.returncode == 0, first.stderr
    assert _memberships(owner, LOGIN_ROLE) == [RUNTIME_ROLE]
    owner.execute(f"ALTER ROLE {LOGIN_ROLE} CREATEDB CREATEROLE")
    owner.execute(f"GRANT pg_read_all_data TO {LOGIN_ROLE}")

    again = run("db", "init", env=env)
    assert again.returncode == 0, again.stderr
    assert not any(_powers(owner, LOGIN_ROLE).values())
    assert _memberships(owner, LOGIN_ROLE) == [RUNTIME_ROLE]
