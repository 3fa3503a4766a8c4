"""The HTTP app's health endpoint against a real PostgreSQL."""

from __future__ import annotations

import psycopg
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from api.http.app import create_app
from api.settings import Settings


def test_healthz_reports_a_reachable_database(db_url: str) -> None:
    with TestClient(create_app(Settings(database_url=db_url), db_url)) as client:
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": True}
    assert response.headers["cache-control"] == "no-store"


def test_healthz_reports_503_when_the_database_is_gone(db_url: str, pg_server_url: str) -> None:
    with TestClient(create_app(Settings(database_url=db_url), db_url)) as client:
        assert client.get("/healthz").status_code == 200
        name = str(conninfo_to_dict(db_url)["dbname"])
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": False}
