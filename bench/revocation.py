"""Revocation everywhere within a second: from a session's end to its token's refusal at a
guarded resource server, what the guard costs, and what feed subscribers cost the database.

    python -m bench.revocation [--url URL] [--revocations 200] [--rate 1000]

Without --url (or LEDGER_DATABASE_URL) it starts an embedded PostgreSQL in a temporary directory.
`session-ledger serve --workers 2` runs in one subprocess, and in another a resource server
(bench.guarded_app: uvicorn, one worker) whose every request goes through session_ledger_guard.

- **Delay to refusal**: while a load generator sends `--rate` requests a second to the resource
  server with live tokens, each of `--revocations` sessions is logged out (DELETE /sessions/{id})
  and its token sent to the resource server every 2 ms until it is refused; the delay runs from
  the logout's answer (its commit came before) to the first refusal. Baseline: PostgreSQL's own
  LISTEN/NOTIFY delivery between two connections, the floor under any push.
- **Calls per request**: requests the guard made to the session service (JWKS, metadata, feed
  connections) per 1,000 guarded requests, counted by httpx event hooks in this process.
- **Cost of the guard**: `guard.verify(token)` beside PyJWT's bare `jwt.decode` of the same token
  with the same key (signature, `aud`, `exp`), in this process.
- **Subscribers**: the database's connections with 1, 10 and 200 event-stream subscribers open.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import httpx
import jwt
import psycopg
from session_ledger_guard import Guard

from api.accounts import SESSIONS_READ_SCOPE, Accounts
from bench.append import load_average, scratch_run
from bench.client_secret import client_secret_key
from bench.guarded_app import RS_CLIENT
from bench.refresh import (
    CLIENT,
    FAST_USER,
    PASSWORD,
    ROOT,
    SERVER_ENV,
    Connection,
    Server,
    api_command,
    create_accounts,
    free_port,
    progress,
    serving,
)
from ledger.db import open_pool

RS_SECRET = "bench-rs-secret-Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF"
AUDIENCE = "session-ledger"
POLL_SECONDS = 0.002


@contextmanager
def resource_server(issuer: str, log: Path) -> Iterator[int]:
    """bench.guarded_app in uvicorn on a free port, until its guard follows the feed."""
    port = free_port()
    env = {**os.environ, "LEDGER_GUARD_ISSUER": issuer, "LEDGER_GUARD_SECRET": RS_SECRET}
    command = [sys.executable, "-m", "uvicorn", "bench.guarded_app:app", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--no-access-log", "--loop", "uvloop"]
    command += ["--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/guard-health", timeout=2).json()
                    if health["connected"]:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"the resource server exited: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            else:
                raise RuntimeError("the resource server's guard never connected")
            yield port
        finally:
            process.terminate()
            process.wait(timeout=30)


async def _login(conn: Connection) -> dict[str, str]:
    form = {"grant_type": "password", "client_id": CLIENT, "username": FAST_USER}
    status, body = await conn.post("/oauth/token", urlencode({**form, "password": PASSWORD}))
    if status != 200:
        raise RuntimeError(f"login failed: {status} {body[:200]!r}")
    tokens: dict[str, str] = json.loads(body)
    return tokens


async def delays(
    server: Server, rs_port: int, revocations: int, rate: int
) -> tuple[list[float], int, int]:
    """Seconds from each logout's answer to the first refusal, and the load's answers."""
    api = Connection(server.port)
    live = [await _login(api) for _ in range(20)]
    doomed = [await _login(api) for _ in range(revocations)]
    served = refused_by_mistake = 0
    stop = asyncio.Event()

    async def load(conn: Connection, share: float) -> None:
        nonlocal served, refused_by_mistake
        n, began = 0, time.perf_counter()
        while not stop.is_set():
            token = live[n % len(live)]["access_token"]
            status, _ = await conn.request("GET", "/whoami", f"Authorization: Bearer {token}\r\n")
            served += 1
            refused_by_mistake += status != 200
            n += 1
            ahead = began + n / share - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)

    loaders = [Connection(rs_port) for _ in range(8)]
    tasks = [asyncio.create_task(load(c, rate / len(loaders))) for c in loaders]
    probe = Connection(rs_port)
    measured = []
    await asyncio.sleep(1.0)  # the load settles
    for tokens in doomed:
        sid = tokens["refresh_token"].split(".")[0]
        bearer = f"Authorization: Bearer {tokens['access_token']}\r\n"
        status, _ = await probe.request("GET", "/whoami", bearer)
        if status != 200:
            raise RuntimeError(f"a live token was refused: {status}")
        status, _ = await api.request("DELETE", f"/sessions/{sid}", bearer)
        if status != 204:
            raise RuntimeError(f"the logout failed: {status}")
        ended = time.perf_counter()
        while (await probe.request("GET", "/whoami", bearer))[0] == 200:
            await asyncio.sleep(POLL_SECONDS)
        measured.append(time.perf_counter() - ended)
    stop.set()
    await asyncio.gather(*tasks)
    for conn in (api, probe, *loaders):
        conn.close()
    return measured, served, refused_by_mistake


def notify_floor(url: str, rounds: int) -> list[float]:
    """PostgreSQL's NOTIFY → LISTEN delivery, one connection to another, as the push floor."""
    times = []
    with (
        psycopg.connect(url, autocommit=True) as listener,
        psycopg.connect(url, autocommit=True) as notifier,
    ):
        listener.execute("LISTEN bench_floor")
        for _ in range(rounds):
            began = time.perf_counter()
            notifier.execute("NOTIFY bench_floor")
            for _ in listener.notifies(timeout=5, stop_after=1):
                pass
            times.append(time.perf_counter() - began)
    return times


def guard_costs(issuer: str, rounds: int) -> tuple[float, float, int, int]:
    """Median seconds of guard.verify and of a bare jwt.decode of one token, and the requests
    the guard made to the service during `rounds` verifications (and in all)."""
    calls = 0

    def count(request: httpx.Request) -> None:
        nonlocal calls
        calls += 1

    http = httpx.Client(timeout=10.0, event_hooks={"request": [count]})
    with Guard(issuer, AUDIENCE, RS_CLIENT, RS_SECRET, http=http) as guard:
        form = {"grant_type": "password", "client_id": CLIENT, "username": FAST_USER}
        tokens = httpx.post(f"{issuer}/oauth/token", data={**form, "password": PASSWORD}).json()
        token = tokens["access_token"]
        guard.verify(token)
        before = calls
        verify = _median(lambda: guard.verify(token), rounds)
        during = calls - before
        jwks = httpx.get(f"{issuer}/.well-known/jwks.json").json()["keys"]
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK(next(k for k in jwks if k["kid"] == kid)).key
        bare = _median(
            lambda: jwt.decode(token, key, algorithms=["EdDSA"], audience=AUDIENCE), rounds
        )
        return verify, bare, during, calls


def _median(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def _subscribe(port: int, token: str, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /feeds/session-ends HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")  # the stream's head: it is open
        writers.append(writer)
    return writers


def subscriber_connections(url: str, server: Server, issuer: str) -> dict[int, int]:
    """The database's connections with 1, 10 and 200 subscribers open."""
    grant = {"grant_type": "client_credentials"}
    token = httpx.post(f"{issuer}/oauth/token", data=grant, auth=(RS_CLIENT, RS_SECRET)).json()
    token = token["access_token"]
    counts = {}

    async def run() -> None:
        opened: list[asyncio.StreamWriter] = []
        for level in (1, 10, 200):
            opened += await _subscribe(server.port, token, level - len(opened))
            await asyncio.sleep(2.0)  # every stream has read its first page
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                ).fetchone()
            counts[level] = int(row[0]) if row else 0
        for writer in opened:
            writer.close()

    asyncio.run(run())
    return counts


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def _p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--revocations", type=int, default=200)
    parser.add_argument("--rate", type=int, default=1000, help="guarded requests a second")
    parser.add_argument("--rounds", type=int, default=20_000, help="verifications to time")
    args = parser.parse_args()
    with scratch_run(args.url) as (url, logs):
        create_accounts(url)
        with open_pool(url, max_size=1) as pool:
            Accounts(pool, secret_key=client_secret_key(pool)).add_client(
                RS_CLIENT, RS_SECRET, ("client_credentials",), (SESSIONS_READ_SCOPE,)
            )
        env = {**os.environ, **SERVER_ENV, "LEDGER_DATABASE_URL": url}
        progress(f"load average before: {load_average()}")
        floor = notify_floor(url, 200)
        with serving(api_command(), env, logs / "api.log") as server:
            issuer = f"http://127.0.0.1:{server.port}"
            progress("the guard's cost and calls, in this process")
            verify, bare, during, calls = guard_costs(issuer, args.rounds)
            progress(f"delay to refusal over {args.revocations} logouts at {args.rate}/s")
            with resource_server(issuer, logs / "rs.log") as rs_port:
                measured, served, wrong = asyncio.run(
                    delays(server, rs_port, args.revocations, args.rate)
                )
            progress("feed subscribers and database connections")
            counts = subscriber_connections(url, server, issuer)
    print(f"load average after: {load_average()}")
    print(f"\n{'figure':<46} {'value':>12} {'baseline':>12} {'ratio':>8}")
    p50, p99 = statistics.median(measured), _p99(measured)
    floor50, floor99 = statistics.median(floor), _p99(floor)
    _row("delay to refusal, p50", _ms(p50), _ms(floor50), p50 / floor50)
    _row("delay to refusal, p99 (target < 1 s)", _ms(p99), _ms(floor99), p99 / floor99)
    _row("  the longest of them", _ms(max(measured)))
    _row("  guarded requests served meanwhile", f"{served:,}", note=f"{wrong} refused")
    per_1000 = during * 1000 / args.rounds
    note = f"{calls} in all: metadata, JWKS, feed"
    _row("service calls per 1,000 requests (target 0)", f"{per_1000:.1f}", note=note)
    us = f"{verify * 1e6:.1f} µs", f"{bare * 1e6:.1f} µs"
    _row("guard.verify, beside jwt.decode (< 1.5x)", *us, verify / bare)
    for level, count in counts.items():
        _row(
            f"database connections, {level} subscribers",
            str(count),
            str(counts[1]),
            count / counts[1],
        )


def _row(
    name: str, value: str, baseline: str = "", ratio: float | None = None, note: str = ""
) -> None:
    shown = "" if ratio is None else f"{ratio:.2f}x"
    print(f"{name:<46} {value:>12} {baseline:>12} {shown:>8}" + (f"  ({note})" if note else ""))


if __name__ == "__main__":
    main()
