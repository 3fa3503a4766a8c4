"""End to end: `serve --workers 2`, and a FastAPI resource server guarded by session_ledger_guard.
An ended session's still-unexpired token is refused there within a second; when the session
server goes away the guard fails closed, and when it is back the guard resumes from its cursor
with nothing missed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from fastapi import FastAPI, Request
from psycopg_pool import ConnectionPool
from session_ledger_guard import Guard, GuardMiddleware

from api.accounts import Accounts
from api.sessions import RequestInfo
from api.users import UserChanges
from projections.session import Policy
from tests.api.conftest import RS_SECRET, add_resource_server, login_at, serve_in_thread
from tests.api.test_serve import free_port, serving, stop_process_group
from tests.waiting import wait_until


def _bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


class ResourceServer:
    """A FastAPI API behind GuardMiddleware, in a thread."""

    def __init__(self, guard: Guard) -> None:
        api = FastAPI()

        @api.get("/orders")
        async def orders(request: Request) -> dict[str, Any]:
            return {"user": request.state.claims["sub"]}

        self.url, self.stop = serve_in_thread(GuardMiddleware(api, guard=guard))

    def status(self, tokens: dict[str, Any]) -> int:
        return requests.get(f"{self.url}/orders", headers=_bearer(tokens), timeout=10).status_code


@pytest.fixture
def resource_client(accounts: Accounts) -> str:
    add_resource_server(accounts)
    return "rs"


@pytest.mark.slow
def test_revocations_reach_a_guarded_api_within_a_second_and_survive_an_outage(
    db_url: str, pool: ConnectionPool, accounts: Accounts, resource_client: str
) -> None:
    port = free_port()
    # No grace window: a refresh token presented twice is reuse at once.
    env = {"LEDGER_DATABASE_URL": db_url, "LEDGER_FEED_HEARTBEAT": "1s"}
    env["LEDGER_REFRESH_GRACE"] = "0"
    with serving("--workers", "2", env=env, port=port) as (url, process):
        guard = Guard(url, "session-ledger", resource_client, RS_SECRET, max_staleness=3.0)
        guard.start()
        rs = ResourceServer(guard)
        try:
            logged_out, everywhere, stolen, kept, missed = (
                login_at(url, name) for name in ("ada", "bob", "ada", "ada", "bob")
            )
            tokens = (logged_out, everywhere, stolen, kept, missed)
            assert [rs.status(t) for t in tokens] == [200] * 5
            sid = logged_out["refresh_token"].split(".")[0]
            requests.delete(f"{url}/sessions/{sid}", headers=_bearer(logged_out), timeout=10)
            wait_until(lambda: rs.status(logged_out) == 401, timeout=1.0, what="the logout")
            requests.delete(f"{url}/sessions", headers=_bearer(everywhere), timeout=10)
            wait_until(lambda: rs.status(everywhere) == 401, timeout=1.0, what="logout everywhere")
            assert rs.status(missed) == 401  # bob's other session ended with it
            missed = login_at(url, "bob")
            form = {"grant_type": "refresh_token", "client_id": "spa"}
            for _ in range(2):  # the second presentation is reuse: the session is revoked
                requests.post(
                    f"{url}/oauth/token",
                    data={**form, "refresh_token": stolen["refresh_token"]},
                    timeout=10,
                )
            wait_until(lambda: rs.status(stolen) == 401, timeout=1.0, what="reuse detection")
            assert rs.status(kept) == 200

            stop_process_group(process)  # the session server goes away
            wait_until(lambda: not guard.health()["connected"], timeout=10, what="the loss")
            changes = UserChanges(
                accounts,
                clock=lambda: datetime.now(UTC),
                policy=Policy(),
                info=RequestInfo("e2e", None, None),
            )
            assert changes.revoke("bob") == 1  # ends while no server is up
            wait_until(lambda: rs.status(kept) == 503, timeout=10, what="failing closed")

            with serving("--workers", "2", env=env, port=port):
                wait_until(lambda: guard.health()["connected"], timeout=15, what="reconnection")
                wait_until(lambda: rs.status(missed) == 401, timeout=1.0, what="the missed end")
                assert rs.status(kept) == 200
        finally:
            rs.stop()
            guard.close()
