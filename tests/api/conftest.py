"""A live API over real HTTP on loopback, on a fresh database, with a clock the test moves."""

from __future__ import annotations

import json
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import requests
import uvicorn
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from psycopg_pool import ConnectionPool

from api.accounts import INTROSPECT_SCOPE, SESSIONS_READ_SCOPE, Accounts
from api.dpop import thumbprint, token_hash
from api.http.app import create_app
from api.keys import CLIENT_SECRET_KEY_NAME, Sealer, load_server_secret
from api.ratelimit import RateLimit
from api.settings import CLIENT_LOCKOUT, IPNetwork, Settings
from ledger.clock import ManualClock
from ledger.store import START, EventStore, RecordedEvent
from projections.principal import LockoutPolicy
from projections.session import Policy
from projections.sql.sweeper import ExpirySweeper
from tests.waiting import wait_until

# Cheap argon2id parameters keep the suite fast; verification cost follows the stored hash.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORD = "correct horse battery staple"
SECRET = "s3cret-of-the-backend-client"
TEST_POLICY = Policy(
    access_token_ttl=timedelta(minutes=15),
    idle_timeout=timedelta(minutes=30),
    absolute_timeout=timedelta(hours=2),
    refresh_grace=timedelta(seconds=10),
    activity_debounce=timedelta(seconds=60),
)
DEFAULT_RATE_LIMIT = RateLimit()
RS_SECRET = "a-resource-server-secret-of-enough-bits-1234"
"""The secret of `rs`, the resource server add_resource_server registers."""


def add_resource_server(accounts: Accounts, *extra_scopes: str) -> None:
    """`rs`: a confidential client with the client_credentials grant that may follow the
    session-end feed (client scope sessions:read, and any `extra_scopes`)."""
    scopes = (SESSIONS_READ_SCOPE, *extra_scopes)
    accounts.add_client("rs", RS_SECRET, ("client_credentials",), scopes)


def sid(tokens: dict[str, Any]) -> str:
    """The session id a grant's refresh token names."""
    return str(tokens["refresh_token"]).split(".")[0]


class DpopKey:
    """A client's DPoP key pair (RFC 9449), signing a fresh proof for each request to `base`,
    dated by the server's clock."""

    def __init__(self, clock: ManualClock, base: str) -> None:
        self.clock, self.base = clock, base
        self.private = ec.generate_private_key(ec.SECP256R1())
        algorithm = jwt.get_algorithm_by_name("ES256")
        self.jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        self.jkt = thumbprint(self.jwk)

    def proof(
        self, method: str, path: str, access_token: str | None = None, nonce: str | None = None
    ) -> str:
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(12),
            "htm": method,
            "htu": self.base + path,
            "iat": int(self.clock.now().timestamp()),
        }
        if access_token is not None:
            claims["ath"] = token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        headers = {"typ": "dpop+jwt", "jwk": self.jwk}
        return jwt.encode(claims, self.private, algorithm="ES256", headers=headers)


def end_three_ways(live: LiveServer) -> list[tuple[str, str]]:
    """A logout, a reuse detection and an idle expiry; their (sid, reason) in order."""
    out = live.login()
    live.delete(f"/sessions/{sid(out)}", headers=live.bearer(out["access_token"]))
    stolen = live.login(username="bob")
    live.refresh(stolen["refresh_token"])
    live.clock.advance(TEST_POLICY.refresh_grace + timedelta(seconds=1))
    live.refresh(stolen["refresh_token"])
    idle = live.login()
    live.clock.advance(TEST_POLICY.idle_timeout)
    ExpirySweeper(live.pool, clock=live.clock.now, policy=TEST_POLICY).sweep()
    return [(sid(out), "logout"), (sid(stolen), "reuse_detected"), (sid(idle), "idle_timeout")]


def login_at(url: str, username: str) -> dict[str, Any]:
    """Log `username` in through the public client spa of the server at `url`."""
    form = {"grant_type": "password", "client_id": "spa", "username": username}
    response = requests.post(f"{url}/oauth/token", data={**form, "password": PASSWORD}, timeout=60)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass
class LiveServer:
    """A running API: its URL, its clock, its database and an HTTP client pointed at it."""

    url: str
    clock: ManualClock
    pool: ConnectionPool
    http: requests.Session
    settings: Settings
    accounts: Accounts
    app: FastAPI
    stop: Callable[[], None]

    def events(self, stream_prefix: str = "") -> list[RecordedEvent]:
        """Every committed event in the ledger (optionally of streams starting with a prefix).

        Read past the catch-up horizon: that horizon is the oldest transaction on the whole
        server, so another database's long transaction would hide events this test just made.
        """
        store, after, events = EventStore(self.pool), START, []
        with self.pool.connection() as conn:
            while page := store.read_visible(after, 1000, conn=conn):
                events += page
                after = page[-1].checkpoint
        return [e for e in events if e.stream_id.startswith(stream_prefix)]

    def types(self, stream_prefix: str = "session:") -> list[str]:
        return [e.type for e in self.events(stream_prefix)]

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url + path, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=30, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.delete(self.url + path, timeout=30, **kwargs)

    def login(self, username: str = "ada", **extra: str) -> dict[str, Any]:
        form = {"grant_type": "password", "username": username, "password": PASSWORD}
        response = self.post("/oauth/token", data={"client_id": "spa", **form, **extra})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def refresh(self, refresh_token: str, client_id: str = "spa") -> requests.Response:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return self.post("/oauth/token", data={"client_id": client_id, **form})

    def bearer(self, access_token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {access_token}"}


def serve_in_thread(app: Any) -> tuple[str, Callable[[], None]]:
    """Run uvicorn on a free loopback port in a thread; return its URL and a stop function."""
    sock = loopback_socket()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", serve_on(app, sock)


def loopback_socket(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` (0: a free one), which a stopped server's port can be
    bound to again at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def serve_on(app: Any, sock: socket.socket) -> Callable[[], None]:
    """Run uvicorn in a thread on a socket bound by the caller; return a stop function."""
    # proxy_headers off, as `serve` runs it: the app reads X-Forwarded-For itself.
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", proxy_headers=False, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def started() -> bool:
        assert server.started or thread.is_alive(), "the API server stopped before it started"
        return server.started

    wait_until(started, timeout=30, what="the API server to start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return stop


def client_secret_key(pool: ConnectionPool) -> bytes:
    """The server secret client secrets are hashed under (created on first need, unsealed)."""
    return load_server_secret(pool, Sealer(None), datetime.now(UTC), CLIENT_SECRET_KEY_NAME)


@pytest.fixture
def accounts(pool: ConnectionPool) -> Accounts:
    accounts = Accounts(pool, CHEAP_HASHER, secret_key=client_secret_key(pool))
    accounts.add_user("ada", PASSWORD, ("profile", "email"))
    accounts.add_user("bob", PASSWORD, ("profile",))
    accounts.add_client("spa", None, ("password", "refresh_token"))
    accounts.add_client("backend", SECRET, ("password", "refresh_token"), (INTROSPECT_SCOPE,))
    accounts.add_client("refresh-only", None, ("refresh_token",))
    return accounts


@pytest.fixture
def live_factory(
    db_url: str, pool: ConnectionPool, clock: ManualClock, accounts: Accounts
) -> Iterator[Callable[..., LiveServer]]:
    stops: list[Callable[[], None]] = []

    def start(
        policy: Policy = TEST_POLICY,
        issuer: str | None = "https://ledger.test",
        audience: str = "session-ledger",
        run_projections: bool = False,
        address_logins: RateLimit = DEFAULT_RATE_LIMIT,
        hasher: PasswordHasher = CHEAP_HASHER,
        client_lockout: LockoutPolicy = CLIENT_LOCKOUT,
        demo: bool = False,
        metrics_token: str | None = None,
        trusted_proxies: tuple[IPNetwork, ...] = (),
        expiry_sweep_interval: timedelta = timedelta(0),
        feed_heartbeat: timedelta = timedelta(seconds=1),
        signal_push_timeout: timedelta = timedelta(seconds=2),
        signal_long_poll: timedelta = timedelta(seconds=2),
        dpop_mismatch_revokes: bool = False,
        dpop_nonce: bool = False,
        port: int = 0,
    ) -> LiveServer:
        """A server on `port` (any free one by default); with `issuer` None, its own URL is its
        issuer, so that clients can follow the metadata's links."""
        sock = loopback_socket(port)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = Settings(
            database_url=db_url,
            issuer=issuer or url,
            audience=audience,
            policy=policy,
            run_projections=run_projections,
            address_logins=address_logins,
            client_lockout=client_lockout,
            demo=demo,
            metrics_token=metrics_token,
            trusted_proxies=trusted_proxies,
            expiry_sweep_interval=expiry_sweep_interval,
            feed_heartbeat=feed_heartbeat,
            signal_push_timeout=signal_push_timeout,
            signal_long_poll=signal_long_poll,
            dpop_mismatch_revokes=dpop_mismatch_revokes,
            dpop_nonce=dpop_nonce,
        )
        app = create_app(settings, db_url, clock=clock, hasher=hasher)
        stop = serve_on(app, sock)
        http = requests.Session()
        stops.append(stop)
        stops.append(http.close)
        return LiveServer(url, clock, pool, http, settings, accounts, app, stop)

    yield start
    for stop in reversed(stops):
        stop()


@pytest.fixture
def live(live_factory: Callable[..., LiveServer]) -> LiveServer:
    return live_factory()
