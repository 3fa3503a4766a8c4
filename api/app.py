from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool

from ledger.db import open_pool, translated_errors
from ledger.errors import LedgerError


def create_app(database_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await run_in_threadpool(open_pool, database_url)
        app.state.pool = pool
        try:
            yield
        finally:
            await run_in_threadpool(pool.close)

    app = FastAPI(title="session-ledger", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        reachable = await run_in_threadpool(_database_reachable, app.state.pool)
        status = 200 if reachable else 503
        body = {"status": "ok" if reachable else "unavailable", "database": reachable}
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return app


def _database_reachable(pool: ConnectionPool) -> bool:
    try:
        with translated_errors(), pool.connection(timeout=2.0) as conn:
            conn.execute("SELECT 1")
    except LedgerError:
        return False
    return True
