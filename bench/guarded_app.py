"""The resource server of `bench.revocation`: one route behind session_ledger_guard's middleware.

    LEDGER_GUARD_ISSUER=http://127.0.0.1:8000 LEDGER_GUARD_SECRET=... \\
        uvicorn bench.guarded_app:app

It verifies every request's token locally and follows the session-end feed as the client
`bench-rs`; GET /whoami answers the token's `sub`, and /guard-health the guard's health.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from session_ledger_guard import Guard, GuardMiddleware

RS_CLIENT = "bench-rs"

guard = Guard(
    issuer=os.environ.get("LEDGER_GUARD_ISSUER", "http://127.0.0.1:8000"),
    audience=os.environ.get("LEDGER_GUARD_AUDIENCE", "session-ledger"),
    client_id=RS_CLIENT,
    client_secret=os.environ.get("LEDGER_GUARD_SECRET", ""),
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    guard.start()
    try:
        yield
    finally:
        guard.close()


api = FastAPI(lifespan=lifespan)


@api.get("/whoami")
async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"sub": request.state.claims["sub"]})


@api.get("/guard-health")
async def health() -> JSONResponse:
    return JSONResponse(guard.health())


app = GuardMiddleware(api, guard=guard, exempt={"/guard-health"})
