"""Soak: a bounded open-loop mixed load at 80% of the capacity measured in the same run.

    python -m bench.soak [--url URL] [--seconds S]

Without --url (or LEDGER_DATABASE_URL) it starts an embedded PostgreSQL in a temporary directory.
The API runs as `session-ledger serve --workers 2` in a subprocess on one fresh database, as in
bench/refresh.py. A short closed-loop phase measures capacity; then requests arrive at fixed
times, at 80% of it, for --seconds, whether or not earlier ones have been answered. Error rate,
latency and each server process's resident memory are compared between the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlencode

from api.accounts import INTROSPECT_SCOPE, Accounts
from api.keys import CLIENT_SECRET_KEY_NAME, Sealer, load_server_secret
from bench.append import Figure, load_average, scratch_run, target
from bench.refresh import (
    CHEAP_HASHER,
    CLIENT,
    PASSWORD,
    SERVER_ENV,
    WARMUP,
    Connection,
    Server,
    api_command,
    connections,
    create_accounts,
    login,
    progress,
    serving,
)
from ledger.db import open_pool

LOAD_SHARE = 0.8  # of the measured capacity, for the steady phase
CONNECTIONS = 32  # enough to saturate both workers; also the most requests in flight at once
SESSIONS = 128  # one user each; every request works on one session not in use by another
CAPACITY_SECONDS = 5.0  # closed loop, after refresh.py's WARMUP
STEADY_WARMUP = 5.0  # of the steady phase, before the first figures and memory sample
SLICE = 0.2  # the first and the last fifth of the measured part of the steady phase
REQUEST_TIMEOUT = 30.0  # from when a request was due: generous, for shared and busy machines
MAX_GROWTH = 0.10  # of any worker's resident memory, from the start to the end
MIN_ACHIEVED = 0.7  # of the target rate: evidence that the load was applied, not a latency bound
RESOURCE_SERVER = "soak-resource-server"
RESOURCE_SECRET = "soak-Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF5g"
TYPO_USER = "soak-typo"  # only ever sent a wrong password: refused, then locked out
# Every login comes from 127.0.0.1: the per-address limit must not refuse the load.
SOAK_ENV = {**SERVER_ENV, "LEDGER_ADDRESS_LOGIN_LIMIT": "100000"}
FAILURES = (OSError, EOFError, LookupError, ValueError, RuntimeError, asyncio.LimitOverrunError)

Outcome = Literal["ok", "refused", "error"]


class Sample(NamedTuple):
    due: float  # when the request was meant to start (perf_counter seconds)
    done: float  # when its answer (or failure) arrived
    outcome: Outcome


@dataclass
class Slot:
    """One user's current session: its latest refresh token and access token."""

    user: str
    refresh_token: str = ""
    access_token: str = ""
    # After a failure its token may have been rotated unseen: the next request signs in again,
    # as a client would.
    is_stale: bool = False

    def kept(self, reply: tuple[int, bytes]) -> tuple[int, bytes]:
        if reply[0] == 200:
            grant = json.loads(reply[1])
            self.refresh_token, self.access_token = grant["refresh_token"], grant["access_token"]
            self.is_stale = False
        return reply


# -- the mixed workload ---------------------------------------------------------------------------


async def _refresh(conn: Connection, slot: Slot) -> tuple[int, bytes]:
    form = {"grant_type": "refresh_token", "client_id": CLIENT, "refresh_token": slot.refresh_token}
    return slot.kept(await conn.post("/oauth/token", urlencode(form)))


async def _login(conn: Connection, slot: Slot) -> tuple[int, bytes]:
    """A new session for the slot's user; the old one is left to idle out, as on a new device."""
    return slot.kept(await login(conn, slot.user))


async def _typo(conn: Connection, slot: Slot) -> tuple[int, bytes]:
    form = {"grant_type": "password", "client_id": CLIENT, "username": TYPO_USER}
    return await conn.post("/oauth/token", urlencode({**form, "password": "a typo"}))


def _bearer(slot: Slot) -> str:
    return f"Authorization: Bearer {slot.access_token}\r\n"


async def _activity(conn: Connection, slot: Slot) -> tuple[int, bytes]:
    return await conn.request("POST", "/sessions/current/activity", _bearer(slot))


async def _sessions(conn: Connection, slot: Slot) -> tuple[int, bytes]:
    return await conn.request("GET", "/sessions", _bearer(slot))


async def _introspect(conn: Connection, slot: Slot) -> tuple[int, bytes]:
    form = {"token": slot.access_token, "client_id": RESOURCE_SERVER}
    return await conn.post(
        "/oauth/introspect", urlencode({**form, "client_secret": RESOURCE_SECRET})
    )


@dataclass(frozen=True)
class Op:
    name: str
    weight: int
    call: Callable[[Connection, Slot], Awaitable[tuple[int, bytes]]]
    refusal: str | None = None  # the OAuth error code of a 400 this request expects


LOGIN = Op("login", 5, _login)
OPS = (
    Op("refresh", 70, _refresh),
    Op("activity", 10, _activity),
    Op("list sessions", 8, _sessions),
    Op("introspect", 5, _introspect),
    LOGIN,
    Op("wrong password", 2, _typo, refusal="invalid_grant"),
)


def _is_refusal(op: Op, status: int, body: bytes) -> bool:
    if op.refusal is None or status != 400:
        return False
    with suppress(ValueError, AttributeError):
        return bool(json.loads(body).get("error") == op.refusal)
    return False


class Workload:
    """Mixed requests, each on a free connection and a free session, recorded as samples."""

    def __init__(self, conns: Sequence[Connection], slots: Sequence[Slot]) -> None:
        self._conns: asyncio.Queue[Connection] = asyncio.Queue()
        self._slots: asyncio.Queue[Slot] = asyncio.Queue()
        for conn in conns:
            self._conns.put_nowait(conn)
        for slot in slots:
            self._slots.put_nowait(slot)
        self._rng = random.Random(1)
        self.samples: list[Sample] = []
        self.errors: Counter[str] = Counter()

    async def request(self, due: float) -> None:
        """One request, answered within REQUEST_TIMEOUT of its start (waiting for a free
        connection included) or counted as an error."""
        op = self._rng.choices(OPS, [op.weight for op in OPS])[0]
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                outcome = await self._send(op)
        except TimeoutError:
            outcome = self._error(f"{op.name}: no answer within {REQUEST_TIMEOUT:g} s")
        self.samples.append(Sample(due, time.perf_counter(), outcome))

    async def _send(self, op: Op) -> Outcome:
        conn = await self._conns.get()
        try:
            slot = await self._slots.get()
            try:
                return await self._call(LOGIN if slot.is_stale else op, conn, slot)
            finally:
                self._slots.put_nowait(slot)
        finally:
            self._conns.put_nowait(conn)

    async def _call(self, op: Op, conn: Connection, slot: Slot) -> Outcome:
        try:
            status, body = await op.call(conn, slot)
        except FAILURES as e:
            _forget(conn, slot)
            return self._error(f"{op.name}: {type(e).__name__} {e}")
        except asyncio.CancelledError:  # its time is up
            _forget(conn, slot)
            raise
        if 200 <= status < 300:
            return "ok"
        if _is_refusal(op, status, body):
            return "refused"
        slot.is_stale = True
        return self._error(f"{op.name}: {status} {body[:160]!r}")

    def _error(self, text: str) -> Outcome:
        self.errors[text] += 1
        return "error"


def _forget(conn: Connection, slot: Slot) -> None:
    """After a request failed midway: a reply may still be on its way, and must not be read as
    the next request's; and the slot's token may have been rotated unseen."""
    conn.close()
    slot.is_stale = True


async def _sign_in(conns: Sequence[Connection], users: Sequence[str]) -> list[Slot]:
    """One session per user, one login at a time (a burst of connections tends to be accepted by
    a single worker)."""
    slots = [Slot(user) for user in users]
    for n, slot in enumerate(slots):
        status, body = await _login(conns[n % len(conns)], slot)
        if status != 200:
            raise RuntimeError(f"set-up login failed with {status}: {body[:300]!r}")
    return slots


async def _closed_loop(workload: Workload, end: float) -> None:
    async def client() -> None:
        while (now := time.perf_counter()) < end:
            await workload.request(now)

    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))


async def _open_loop(workload: Workload, rate: float, start: float, seconds: float) -> None:
    """A bounded number of requests at fixed times; latency counts from the time each was due,
    so waiting for a free connection behind slow answers is not hidden."""
    tasks: set[asyncio.Task[None]] = set()
    for n in range(round(rate * seconds)):
        due = start + n / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(workload.request(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)  # each ends within REQUEST_TIMEOUT


# -- resident memory of serve's processes (Linux /proc) -------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def process_memory(parent: int) -> dict[int, int]:
    """VmRSS in KiB of serve's supervisor and of each of its children."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    found = {}
    for pid in (parent, *map(int, children)):
        with suppress(OSError):  # exited meanwhile: missing from the sample
            found[pid] = _rss_kib(pid)
    return found


def _role(pid: int, parent: int) -> str:
    if pid == parent:
        return "serve"
    # uvicorn spawns its workers through multiprocessing, which also starts a resource tracker.
    is_worker = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return "worker" if is_worker else "helper"


async def _sample_memory(parent: int, moments: Sequence[float]) -> Memory:
    taken = []
    for moment in moments:
        await asyncio.sleep(max(0.0, moment - time.perf_counter()))
        taken.append(process_memory(parent))
    roles = {pid: _role(pid, parent) for pid in taken[0]}
    return Memory(roles, taken[0], taken[-1])


@dataclass(frozen=True)
class Memory:
    """VmRSS in KiB by pid at the start and at the end of the measured window."""

    roles: dict[int, str]  # serve, worker or helper, by pid at the start
    start: dict[int, int]
    end: dict[int, int]

    @property
    def workers(self) -> list[int]:
        return [pid for pid, role in self.roles.items() if role == "worker"]

    @property
    def is_unchanged(self) -> bool:
        """The same processes at the end: no worker died or was replaced."""
        return self.start.keys() == self.end.keys()

    def growth(self, pid: int) -> float:
        return self.end[pid] / self.start[pid] - 1 if pid in self.end else float("inf")

    @property
    def total_growth(self) -> float:
        return sum(self.end.values()) / sum(self.start.values()) - 1


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Requests that ended in one window: answered ones (success or expected refusal) in the
    figure, with latencies from when each was due; failures apart."""

    figure: Figure
    refusals: int
    errors: int

    @property
    def error_rate(self) -> float:
        total = self.figure.count + self.errors
        return self.errors / total if total else 0.0

    def line(self) -> str:
        return (
            f"{self.figure.line()}   errors {self.errors} ({self.error_rate:.2%})"
            f"   expected refusals {self.refusals}"
        )


def _slice(samples: Sequence[Sample], name: str, begin: float, end: float) -> Slice:
    inside = [s for s in samples if begin <= s.done < end]
    answered = [s.done - s.due for s in inside if s.outcome != "error"]
    figure = Figure(name, len(answered), end - begin, answered if len(answered) > 1 else [])
    refusals = sum(s.outcome == "refused" for s in inside)
    return Slice(figure, refusals, len(inside) - len(answered))


@dataclass(frozen=True)
class SoakResult:
    capacity: Slice
    target_rate: float
    first: Slice
    last: Slice
    steady: Slice  # the whole measured window, warm-up excluded
    memory: Memory
    errors: Counter[str]  # of the whole run, by kind

    @property
    def detectable_leak(self) -> float:
        """Bytes retained per request that would add MAX_GROWTH to the smallest worker's memory
        in this run, if the requests split evenly between the workers."""
        workers = self.memory.workers
        per_worker = self.steady.figure.count / max(len(workers), 1)
        smallest = min((self.memory.start[pid] for pid in workers), default=0)
        return MAX_GROWTH * smallest * 1024 / max(per_worker, 1)


# -- the run --------------------------------------------------------------------------------------


def create_soak_accounts(url: str) -> list[str]:
    """refresh.py's accounts, a confidential client for introspection, and cheap-hash users."""
    create_accounts(url)
    users = [f"soak-{n}" for n in range(SESSIONS)]
    with open_pool(url, max_size=1) as pool:
        key = load_server_secret(pool, Sealer(None), datetime.now(UTC), CLIENT_SECRET_KEY_NAME)
        accounts = Accounts(pool, CHEAP_HASHER, secret_key=key)
        grants = ("password", "refresh_token")
        accounts.add_client(RESOURCE_SERVER, RESOURCE_SECRET, grants, (INTROSPECT_SCOPE,))
        for user in (TYPO_USER, *users):
            accounts.add_user(user, PASSWORD, ("profile",))
    return users


async def _capacity(workload: Workload) -> Slice:
    begin = time.perf_counter() + WARMUP
    await _closed_loop(workload, begin + CAPACITY_SECONDS)
    name = f"capacity: closed loop, {CONNECTIONS} connections"
    return _slice(workload.samples, name, begin, begin + CAPACITY_SECONDS)


async def _soak(server: Server, users: Sequence[str], seconds: float) -> SoakResult:
    with connections(server, CONNECTIONS) as conns:
        workload = Workload(conns, await _sign_in(conns, users))
        progress(f"capacity, closed loop for {WARMUP + CAPACITY_SECONDS:g} s")
        capacity = await _capacity(workload)
        rate = LOAD_SHARE * capacity.figure.rate
        if not rate:
            raise RuntimeError(f"nothing answered in the capacity phase: {workload.errors}")
        progress(f"steady phase, {rate:,.0f} requests/s for {seconds:g} s")
        start = time.perf_counter()
        begin, end = start + STEADY_WARMUP, start + seconds
        sampling = asyncio.create_task(_sample_memory(server.pid, (begin, end)))
        await _open_loop(workload, rate, start, seconds)
        memory = await sampling
    edge = SLICE * (end - begin)
    pct = f"{SLICE:.0%} ({edge:.1f} s)"
    return SoakResult(
        capacity,
        rate,
        _slice(workload.samples, f"steady, first {pct}", begin, begin + edge),
        _slice(workload.samples, f"steady, last {pct}", end - edge, end),
        _slice(workload.samples, f"steady, all {end - begin:g} s after warm-up", begin, end),
        memory,
        workload.errors,
    )


def run(url: str, seconds: float, logs: Path) -> SoakResult:
    """Serve the API on the database at `url` and soak it for `seconds` (the steady phase)."""
    if seconds <= 2 * STEADY_WARMUP:
        raise ValueError(f"the steady phase needs more than {2 * STEADY_WARMUP:g} s")
    users = create_soak_accounts(url)
    env = {**os.environ, **SOAK_ENV, "LEDGER_DATABASE_URL": url}
    with serving(api_command(), env, logs / "api.log") as api:
        return asyncio.run(_soak(api, users, seconds))


def report(result: SoakResult) -> None:
    print(result.capacity.line())
    print(f"{f'target: {LOAD_SHARE:.0%} of capacity':<44} {result.target_rate:>11,.0f}/s")
    for part in (result.first, result.last, result.steady):
        print(part.line())
    for text, count in result.errors.most_common(10):
        print(f"  {count:>6} x {text}")
    print(_memory_table(result.memory))
    print(f"a leak of {result.detectable_leak:,.0f} bytes per request would grow a worker 10%")
    for line in verdict(result):
        print(line)


def _memory_table(memory: Memory) -> str:
    lines = [f"{'VmRSS':<16} {'start':>10} {'end':>10} {'growth':>8}"]
    for pid, role in memory.roles.items():
        start, end = memory.start[pid], memory.end.get(pid)
        growth = "  (gone)" if end is None else f"{memory.growth(pid):+8.1%}"
        lines.append(f"{f'{role} {pid}':<16} {_mib(start):>10} {_mib(end):>10} {growth}")
    for pid in memory.end.keys() - memory.start.keys():
        lines.append(f"{f'new {pid}':<16} {'-':>10} {_mib(memory.end[pid]):>10}")
    start, end = sum(memory.start.values()), sum(memory.end.values())
    lines.append(f"{'all':<16} {_mib(start):>10} {_mib(end):>10} {memory.total_growth:+8.1%}")
    return "\n".join(lines)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def verdict(result: SoakResult) -> list[str]:
    errors, memory = sum(result.errors.values()), result.memory
    achieved = result.steady.figure.rate / result.target_rate
    growth = max(memory.growth(pid) for pid in memory.workers)
    return [
        target(errors == 0, f"no errors: {errors}"),
        target(
            achieved >= MIN_ACHIEVED, f"≥ {MIN_ACHIEVED:.0%} of the target rate: {achieved:.0%}"
        ),
        target(memory.is_unchanged, "the same serve processes at the end as at the start"),
        target(growth < MAX_GROWTH, f"worker memory growth < {MAX_GROWTH:.0%}: {growth:+.1%}"),
    ]


def _steady_seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 2 * STEADY_WARMUP:
        raise argparse.ArgumentTypeError(f"--seconds must be more than {2 * STEADY_WARMUP:g}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", "--database-url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--seconds", type=_steady_seconds, default=120.0, help="the steady phase")
    args = parser.parse_args()

    with scratch_run(args.url) as (url, logs):
        print(f"{os.cpu_count()} cores, steady phase {args.seconds:g} s,", end=" ")
        print(f"load average {load_average()}")
        sys.stdout.flush()  # before the progress lines on stderr
        report(run(url, args.seconds, logs))


if __name__ == "__main__":
    main()
