"""What a wrong client secret costs: the verifier alone, and a server under a flood of them.

    python -m bench.client_secret [--url URL] [--seconds S] [--callers 16]

Without --url (or LEDGER_DATABASE_URL) it starts an embedded PostgreSQL in a temporary directory.
First the two verifiers in this process: argon2id with production parameters, as client secrets
were checked before, against the keyed hash they are checked with now (api.accounts). Then
`session-ledger serve --workers 2` in a subprocess, three times, each with `--callers` keep-alive
connections sending wrong secrets to `POST /oauth/introspect` by HTTP Basic for `--seconds`,
while one more connection logs in with a production-argon2 password over and over:

- `argon2 secrets` (the baseline, as before): a client whose secret is stored as an argon2id hash
  (verified that way until its first successful use), with the address limit and the client lockout
  made too wide to trip, so that every wrong secret runs argon2;
- `keyed hash`: the same flood against a client with a keyed hash, limits as wide;
- `defaults`: the keyed-hash client and every default limit: the flood soon gets 429.

Each line shows the answers by status, and the busiest worker's peak memory (VmRSS, sampled
every 0.1 s). The login lines show the logins' p50 alone and under each flood.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from api.accounts import INTROSPECT_SCOPE, PRODUCTION_HASHER, Accounts, Client
from api.keys import CLIENT_SECRET_KEY_NAME, Sealer, load_server_secret
from bench.append import load_average, scratch_run
from bench.refresh import (
    SERVER_ENV,
    Connection,
    Server,
    api_command,
    connections,
    create_accounts,
    login,
    progress,
    serving,
)
from bench.soak import process_memory
from ledger.db import open_pool

LEGACY, KEYED = "bench-legacy", "bench-keyed"
SECRET = "bench-Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF5g"
WRONG = "bench-wrong-guess-000000000000000000000"
GRANTS = ("password", "refresh_token")
WIDE_OPEN = {
    "LEDGER_ADDRESS_LOGIN_LIMIT": "1000000",
    # A lock needs 32 failures within one second: more than argon2 allows on two cores.
    "LEDGER_CLIENT_MAX_FAILURES": "32",
    "LEDGER_CLIENT_FAILURE_WINDOW": "1s",
}
DEFAULT_LIMITS = {"LEDGER_ADDRESS_LOGIN_LIMIT": "30"}


@dataclass
class Flood:
    name: str
    answers: Counter[int]
    seconds: float
    peak_worker_kib: int
    start_worker_kib: int
    login_p50_ms: float | None
    logins: int
    logins_refused: Counter[int]

    def line(self) -> str:
        total = sum(self.answers.values())
        statuses = ", ".join(f"{status}: {n:,}" for status, n in sorted(self.answers.items()))
        return (
            f"{self.name:<34} {total / self.seconds:>8,.0f}/s   ({statuses})   busiest worker"
            f" {self.start_worker_kib / 1024:.0f} → {self.peak_worker_kib / 1024:.0f} MiB"
        )


def verifier_costs(pool: ConnectionPool, rounds: int) -> tuple[float, float]:
    """Median seconds to refuse a wrong secret: argon2id (production), then the keyed hash."""
    accounts = Accounts(pool, PRODUCTION_HASHER, secret_key=client_secret_key(pool))
    legacy = Client(LEGACY, PRODUCTION_HASHER.hash(SECRET), GRANTS)
    keyed = Client(KEYED, accounts.secret_hash(SECRET), GRANTS)
    return (
        _median(lambda: accounts.check_legacy_secret(legacy, WRONG), rounds),
        _median(lambda: accounts.check_secret(keyed, WRONG), rounds * 1000),
    )


def _median(work: Callable[[], bool], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        if work():
            raise RuntimeError("a wrong secret was accepted")
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def client_secret_key(pool: ConnectionPool) -> bytes:
    return load_server_secret(pool, Sealer(None), datetime.now(UTC), CLIENT_SECRET_KEY_NAME)


def create_clients(pool: ConnectionPool) -> None:
    Accounts(pool, secret_key=client_secret_key(pool)).add_client(
        KEYED, SECRET, GRANTS, (INTROSPECT_SCOPE,)
    )
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO clients (client_id, secret_hash, grants, scopes) VALUES (%s, %s, %s, %s)",
            (LEGACY, PRODUCTION_HASHER.hash(SECRET), list(GRANTS), [INTROSPECT_SCOPE]),
        )


def _basic(client_id: str) -> str:
    encoded = base64.b64encode(f"{client_id}:{WRONG}".encode()).decode()
    return f"Authorization: Basic {encoded}\r\nContent-Type: application/x-www-form-urlencoded\r\n"


async def _flood(server_pid: int, port: int, client_id: str, callers: int, seconds: float) -> Flood:
    answers: Counter[int] = Counter()
    refused: Counter[int] = Counter()
    logins: list[float] = []
    end = time.perf_counter() + seconds
    headers = _basic(client_id)

    async def caller(conn: Connection) -> None:
        while time.perf_counter() < end:
            status, _ = await conn.request("POST", "/oauth/introspect", headers, b"token=x")
            answers[status] += 1

    async def logging_in(conn: Connection) -> None:
        while time.perf_counter() < end:
            began = time.perf_counter()
            status, _ = await login(conn, "bench-slow-0")
            if status == 200:
                logins.append(time.perf_counter() - began)
            else:  # 429: the flood comes from the same address and used up its attempts
                refused[status] += 1

    start = _busiest(server_pid)
    peak = start

    async def sample() -> None:
        nonlocal peak
        while time.perf_counter() < end:
            peak = max(peak, _busiest(server_pid))
            await asyncio.sleep(0.1)

    with connections(Server(port, server_pid), callers + 1) as conns:
        tasks = [caller(c) for c in conns[:callers]]
        await asyncio.gather(*tasks, logging_in(conns[callers]), sample())
    p50 = statistics.median(logins) * 1000 if logins else None
    return Flood("", answers, seconds, peak, start, p50, len(logins), refused)


def _busiest(server_pid: int) -> int:
    memory = process_memory(server_pid)
    workers = [kib for pid, kib in memory.items() if pid != server_pid]
    return max(workers, default=0)


async def _login_alone(port: int, seconds: float) -> float:
    times = []
    end = time.perf_counter() + seconds
    with connections(Server(port, 0), 1) as (conn,):
        while time.perf_counter() < end:
            began = time.perf_counter()
            await login(conn, "bench-slow-0")
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def run(url: str, seconds: float, callers: int, logs: Path) -> tuple[float, list[Flood]]:
    floods = []
    alone = 0.0
    cases = [
        ("argon2 secrets (as before)", LEGACY, WIDE_OPEN),
        ("keyed hash", KEYED, WIDE_OPEN),
        ("keyed hash, default limits", KEYED, DEFAULT_LIMITS),
    ]
    for n, (name, client_id, limits) in enumerate(cases):
        env = {**os.environ, **SERVER_ENV, **limits, "LEDGER_DATABASE_URL": url}
        with serving(api_command(), env, logs / f"api-{n}.log") as server:
            if n == 0:
                progress("logins alone")
                alone = asyncio.run(_login_alone(server.port, seconds))
            progress(f"{callers} callers with wrong secrets: {name}")
            flood = asyncio.run(_flood(server.pid, server.port, client_id, callers, seconds))
            flood.name = name
            floods.append(flood)
    return alone, floods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per figure")
    parser.add_argument("--callers", type=int, default=16, help="parallel wrong-secret callers")
    args = parser.parse_args()

    with scratch_run(args.url) as (url, logs):
        with psycopg.connect(url) as conn:
            version = conn.info.server_version
        print(f"PostgreSQL {version // 10000}.{version % 10000}, {os.cpu_count()} cores,", end=" ")
        print(f"load average {load_average()}")
        create_accounts(url)
        with open_pool(url, max_size=1) as pool:
            create_clients(pool)
            slow, fast = verifier_costs(pool, 20)
        print(f"{'argon2id check of a wrong secret':<34} {slow * 1000:>8.1f} ms   (the baseline)")
        share = f"{fast / slow:.4%} of the baseline"
        print(f"{'keyed-hash check of a wrong secret':<34} {fast * 1e6:>8.1f} µs   ({share})")
        sys.stdout.flush()  # before the progress lines on stderr
        alone, floods = run(url, args.seconds, args.callers, logs)
    print(f"{'login (production argon2) alone':<34} p50 {alone:6.1f} ms")
    for flood in floods:
        print(flood.line())
        if flood.login_p50_ms is not None:
            ratio = flood.login_p50_ms / alone
            during = f"p50 {flood.login_p50_ms:6.1f} ms   ({ratio:.1f} times alone)"
            print(f"{'  login during it':<34} {during}", end="")
        refused = ", ".join(f"{status}: {n}" for status, n in flood.logins_refused.items())
        print(f"   {flood.logins} logins" + (f", refused {refused}" if refused else ""))


if __name__ == "__main__":
    main()
