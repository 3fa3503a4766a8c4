from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool

from api.accounts import PRODUCTION_HASHER, Accounts, ClientDirectory
from api.changes import ChangeFollower, OnChange
from api.clients import ClientAuthentication
from api.dpop import Nonces
from api.dpop_replay import ProofPruner
from api.feed import SessionEndHub
from api.http import (
    audit,
    authorize,
    edge,
    errors,
    feeds,
    metrics,
    oauth,
    openapi,
    sessions,
    signals,
)
from api.http.browser import router as browser_router
from api.keys import (
    CLIENT_SECRET_KEY_NAME,
    DPOP_NONCE_KEY_NAME,
    LOGIN_FORM_KEY_NAME,
    Sealer,
    load_event_signing_key,
    load_server_secret,
)
from api.sessions import SessionService
from api.settings import Settings
from api.signals import Pusher, Signals
from ledger.clock import Clock, SystemClock
from ledger.db import RUNTIME_ROLE, AsyncLedgerPool, open_async_pool, open_pool, translated_errors
from ledger.errors import LedgerError
from ledger.store import EventStore
from projections.sql.runner import Runner
from projections.sql.sweeper import ExpirySweeper

PRUNE_SECONDS = 10.0
"""How often a server empties the DPoP proof partition that has aged out (api.dpop_replay)."""


def create_app(
    settings: Settings,
    database_url: str,
    *,
    clock: Clock | None = None,
    hasher: PasswordHasher = PRODUCTION_HASHER,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await run_in_threadpool(lambda: open_pool(database_url, role=RUNTIME_ROLE))
        apool: AsyncLedgerPool | None = None
        runner: Runner | None = None
        sweeper: ExpirySweeper | None = None
        pusher: Pusher | None = None
        pruner: ProofPruner | None = None
        following: asyncio.Task[None] | None = None
        feeding: asyncio.Task[None] | None = None
        try:
            apool = await open_async_pool(database_url, role=RUNTIME_ROLE)
            sealer = Sealer(settings.key_encryption_key)
            now = (clock or SystemClock()).now
            secret_key = await run_in_threadpool(
                load_server_secret, pool, sealer, now(), CLIENT_SECRET_KEY_NAME
            )
            accounts = Accounts(pool, hasher, secret_key=secret_key)
            app.state.login_form_key = await run_in_threadpool(
                load_server_secret, pool, sealer, now(), LOGIN_FORM_KEY_NAME
            )
            # The first unknown-user login must not be the one that pays for the stand-in hash.
            await run_in_threadpool(accounts.check_password, None, "")
            app.state.pool = pool
            app.state.settings = settings
            follower = ChangeFollower(database_url, _changes_to(app), role=RUNTIME_ROLE)
            app.state.clients = ClientDirectory(apool, live=lambda: follower.listening)
            app.state.service = await run_in_threadpool(
                SessionService,
                pool,
                apool,
                accounts,
                app.state.clients,
                settings,
                now,
                sealer,
            )
            event_key = await run_in_threadpool(load_event_signing_key, pool, sealer, now())
            app.state.signals = Signals(
                pool, event_key, sealer, issuer=settings.issuer, clock=app.state.service.clock
            )
            app.state.metrics = metrics.registry(
                latency, pool, app.state.service.clock, app.state.signals
            )
            app.state.client_authentication = ClientAuthentication(
                pool,
                apool,
                app.state.clients,
                accounts,
                lockout=settings.client_lockout,
                per_address=settings.address_logins,
                clock=now,
            )
            following = asyncio.create_task(follower.run(), name="ledger-changes")
            hub = SessionEndHub(database_url, EventStore(pool), role=RUNTIME_ROLE)
            app.state.session_ends = hub
            feeding = asyncio.create_task(hub.run(), name="session-end-feed")
            runner = _start_runner(database_url, pool) if settings.run_projections else None
            if settings.expiry_sweep_interval:
                sweeper = ExpirySweeper(
                    pool,
                    clock=now,
                    policy=settings.policy,
                    interval_seconds=settings.expiry_sweep_interval.total_seconds(),
                ).start()
            app.state.dpop_nonces = None
            if settings.dpop_nonce:
                nonce_key = await run_in_threadpool(
                    load_server_secret, pool, sealer, now(), DPOP_NONCE_KEY_NAME
                )
                app.state.dpop_nonces = Nonces(nonce_key)
            pruner = ProofPruner(app.state.service.proof_replay, now, PRUNE_SECONDS).start()
            pusher = Pusher(
                app.state.signals,
                database_url,
                role=RUNTIME_ROLE,
                timeout_seconds=settings.signal_push_timeout.total_seconds(),
            ).start()
            yield
        finally:
            for task in (following, feeding):
                if task is not None:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
            for worker in (sweeper, pusher, pruner):
                if worker is not None:
                    await run_in_threadpool(worker.stop)
            if runner is not None:
                await run_in_threadpool(runner.stop)
            if apool is not None:
                await apool.close()
            await run_in_threadpool(pool.close)

    app = FastAPI(
        title="session-ledger",
        lifespan=lifespan,
        # A trailing-slash redirect is built from the request's Host header and a 307 resends
        # the body: an unknown path is a 404 instead.
        redirect_slashes=False,
        # FastAPI's pages load Swagger UI and ReDoc from a public CDN; /openapi.json is enough
        # for tools, and the pages are served only when asked for (LEDGER_API_DOCS).
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,
    )
    latency = metrics.latency_histogram()
    errors.install(app)
    edge.install(app, latency)
    app.include_router(oauth.router)
    app.include_router(authorize.router)
    app.include_router(sessions.router)
    app.include_router(audit.router)
    app.include_router(feeds.router)
    app.include_router(signals.router)
    app.include_router(metrics.router)
    app.include_router(browser_router)

    @app.get("/healthz", responses=openapi.HEALTH_RESPONSES)
    async def healthz() -> JSONResponse:
        reachable = await run_in_threadpool(_database_reachable, app.state.pool)
        status = 200 if reachable else 503
        body = {"status": "ok" if reachable else "unavailable", "database": reachable}
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return app


def app_from_env() -> FastAPI:
    """The app for `uvicorn --factory` workers: settings and database URL from the environment."""
    settings = Settings.from_env()
    if settings.database_url is None:
        raise RuntimeError("workers need LEDGER_DATABASE_URL; `session-ledger serve` sets it")
    return create_app(settings, settings.database_url)


def _changes_to(app: FastAPI) -> OnChange:
    """What a worker does when clients or signing keys change: forget, or read them again."""

    async def changed(table: str | None) -> None:
        if table in (None, "clients"):
            app.state.clients.forget()
        if table in (None, "signing_keys"):
            await run_in_threadpool(app.state.service.reload_keys)

    return changed


def _start_runner(url: str, pool: ConnectionPool) -> Runner:
    """Keep the catch-up projections current from this process (one runner per projection is
    active across all processes; the others stand by)."""
    runner = Runner(url, pool, role=RUNTIME_ROLE)
    threading.Thread(target=runner.run, name="projection-runner", daemon=True).start()
    return runner


def _database_reachable(pool: ConnectionPool) -> bool:
    try:
        with translated_errors(), pool.connection(timeout=2.0) as conn:
            conn.execute("SELECT 1")
    except LedgerError:
        return False
    return True
