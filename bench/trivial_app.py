"""The ceiling for `bench.refresh`: a FastAPI app whose token endpoint does no work at all.

Served like `session-ledger serve` (uvicorn, the same host, workers and log level), it answers the
refresh load generator's requests with a constant body of the same shape, so the figure measures
HTTP, ASGI and the client alone.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request, Response

BODY = json.dumps(
    {
        "access_token": "x" * 600,
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "trivial",
        "scope": "profile",
    }
).encode()

app = FastAPI(title="bench trivial endpoint")


@app.post("/oauth/token")
async def token(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json", headers={"Cache-Control": "no-store"})


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
