"""Whether a login's answer time tells which user names exist: unknown user beside wrong password.

    python -m bench.login_timing [--url URL] [--tries 20]

Runs `session-ledger serve` (production argon2id) on a fresh database and times, one at a time
and interleaved, failed logins with a wrong password for existing users and with user names that
do not exist. Each try uses a name of its own, so no lockout cuts a try short, and the address
limit is raised so that none is throttled. The medians should match: the wrong-password median
is the baseline the unknown-user one is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from urllib.parse import urlencode

import psycopg

from api.accounts import PRODUCTION_HASHER, Accounts
from bench.append import load_average, scratch_run, target
from bench.refresh import CHEAP_HASHER, CLIENT, PASSWORD, Connection, api_command, serving
from ledger.db import open_pool

SERVER_ENV = {"LEDGER_ADDRESS_LOGIN_LIMIT": "100000"}


def create_users(url: str, tries: int) -> None:
    with open_pool(url, max_size=1) as pool:
        Accounts(pool, CHEAP_HASHER).add_client(CLIENT, None, ("password", "refresh_token"))
        accounts = Accounts(pool, PRODUCTION_HASHER)
        for n in range(tries):
            accounts.add_user(f"known-{n}", PASSWORD, ())


async def _time_failures(port: int, tries: int) -> dict[str, list[float]]:
    conn = Connection(port)
    seconds: dict[str, list[float]] = {"wrong password": [], "unknown user": []}
    await _fail(conn, "warm-up")  # the first request of a connection pays for its setup
    for n in range(tries):
        for kind, name in (("wrong password", f"known-{n}"), ("unknown user", f"nobody-{n}")):
            started = time.perf_counter()
            await _fail(conn, name)
            seconds[kind].append(time.perf_counter() - started)
    conn.close()
    return seconds


async def _fail(conn: Connection, username: str) -> None:
    form = {"grant_type": "password", "client_id": CLIENT, "username": username}
    status, body = await conn.post("/oauth/token", urlencode({**form, "password": "wrong"}))
    if status != 400 or b"invalid_grant" not in body:
        raise RuntimeError(f"a failed login answered {status}: {body[:200]!r}")


def report(seconds: dict[str, list[float]]) -> None:
    wrong = statistics.median(seconds["wrong password"])
    unknown = statistics.median(seconds["unknown user"])
    tries = len(seconds["wrong password"])
    print(f"{'failed login, production argon2id':<40} {'median':>9} {'longest':>9}  tries")
    for kind, values in seconds.items():
        longest = max(values)
        print(
            f"{kind:<40} {statistics.median(values) * 1000:>6.1f} ms {longest * 1000:>6.1f} ms"
            f"  {tries}"
        )
    ratio = unknown / wrong if wrong else 0.0
    print()
    print(
        target(
            0.8 <= ratio <= 1.25,
            f"unknown user / wrong password median within 0.8 to 1.25: {ratio:.2f}",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--tries", type=int, default=20, help="failed logins of each kind")
    args = parser.parse_args()
    with scratch_run(args.url) as (url, logs):
        with psycopg.connect(url) as conn:
            version = conn.info.server_version
        print(f"PostgreSQL {version // 10000}, {os.cpu_count()} cores,", end=" ")
        print(f"load average {load_average()}")
        sys.stdout.flush()
        create_users(url, args.tries)
        env = {**os.environ, **SERVER_ENV, "LEDGER_DATABASE_URL": url}
        with serving(api_command(), env, logs / "api.log") as api:
            seconds = asyncio.run(_time_failures(api.port, args.tries))
        report(seconds)


if __name__ == "__main__":
    main()
