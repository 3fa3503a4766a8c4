"""Refresh throughput of the HTTP API beside a raw-PostgreSQL baseline and a trivial endpoint.

    python -m bench.refresh [--url URL] [--seconds S] [--levels 1,16,64]

Without --url (or LEDGER_DATABASE_URL) it starts an embedded PostgreSQL in a temporary directory.
The API runs as `session-ledger serve --workers 2` in a subprocess on one fresh database; each
client is one keep-alive connection with its own session, sending every response's rotated
refresh token in its next request. The DPoP line does the same with sessions bound to each
client's ES256 key (RFC 9449), every refresh with a fresh proof; the proofs are signed before
the measured window, so that the load generator's signing does not take the server's cores.
The baselines: a refresh's writes run by pgbench on the same
server (PostgreSQL 16's, shipped with pgserver; a psycopg loop where none is found), and the
framework floor, a trivial FastAPI endpoint under the same uvicorn settings. The combined floor,
1/(1/raw + 1/floor), is what one refresh doing both on the same cores would allow. Every figure
comes from one run, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import jwt
import psycopg
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric import ec
from pgserver._commands import POSTGRES_BIN_PATH
from psycopg_pool import ConnectionPool

from api.accounts import PRODUCTION_HASHER, Accounts
from bench.append import Figure, load_average, p99, scratch_run, target
from ledger.chain import GENESIS
from ledger.db import open_pool
from projections.session import ROTATIONS_KEPT
from projections.streams import session_stream_id

ROOT = Path(__file__).resolve().parent.parent
CLIENT, PASSWORD, FAST_USER = "bench-spa", "bench-password", "bench-fast"
LOGIN_CLIENTS = 4  # each logs in as its own user, so no two queue on one principal row lock
USER_AGENT = "bench-refresh/1 (session-ledger)"
WARMUP = 1.0
SERVER_POOL = 20  # `serve` opens a pool of at most 10 connections in each of its 2 workers
# Sessions must outlive the run, whatever --seconds says.
SERVER_ENV = {
    "LEDGER_ACCESS_TOKEN_TTL": "1h",
    "LEDGER_IDLE_TIMEOUT": "8h",
    "LEDGER_ABSOLUTE_TIMEOUT": "1d",
    # Every set-up login and the login figure come from one address: no per-address limit.
    "LEDGER_ADDRESS_LOGIN_LIMIT": "1000000",
}
# Argon2 verification costs what the stored hash says: set-up logins use this cheap one.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

RAW_LOCK = "SELECT version, generation FROM sessions WHERE session_id = %s FOR UPDATE"
RAW_EVENT = (
    "INSERT INTO events (stream_id, stream_type, version, type, schema_version, data, metadata,"
    " occurred_at, prev_hash, hash) VALUES (%s, 'session', %s, 'RefreshTokenRotated', 1, %s, %s,"
    " %s, %s, %s)"
)
RAW_UPDATE = (
    "UPDATE sessions SET version = %s, generation = %s, rotations = (CASE WHEN"
    f" jsonb_array_length(rotations) >= {ROTATIONS_KEPT} THEN rotations - 0 ELSE rotations END)"
    " || %s::jsonb"
    " WHERE session_id = %s"
)
RAW_SESSION = (
    "INSERT INTO sessions (session_id, version, user_name, client_id, scope, started_at,"
    " last_activity, generation, rotations, ip, user_agent)"
    " VALUES (%s, 1, %s, %s, '{profile}', now(), now(), 1, '[]', '127.0.0.1', %s)"
)

Sample = tuple[float, float]  # when a request began and ended (perf_counter seconds)


@dataclass
class Result:
    figure: Figure
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu: float | None = None  # share of one core the load generator used
    worker_cpu: list[float] = field(default_factory=list)  # each server worker's, busiest first
    late_proofs: int = 0  # DPoP proofs the load generator signed inside the run

    def line(self, baseline: Result | None = None) -> str:
        base = baseline.figure if baseline and baseline.figure.rate > 0 else None
        text = self.figure.line(base) + f"   errors {sum(self.errors.values())}"
        if self.client_cpu is not None:
            text += f"   CPU: client {self.client_cpu:.0%}"
        if self.worker_cpu:
            text += ", workers " + " + ".join(f"{share:.0%}" for share in self.worker_cpu)
        if self.late_proofs:
            text += f"   ({self.late_proofs} proofs signed during the run)"
        return text


def _figure(name: str, samples: list[Sample], begin: float, seconds: float) -> Figure:
    """Requests that ended inside the measured window, which follows the warm-up."""
    end = begin + seconds
    kept = [done - began for began, done in samples if begin <= done <= end]
    return Figure(name, len(kept), seconds, kept if len(kept) > 1 else [])


# -- the server under test ----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    port: int
    pid: int  # uvicorn's supervisor; its children are the workers


@contextmanager
def serving(command: Sequence[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """Run an HTTP server subprocess on a free port until /healthz answers; stop it afterwards."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share its process group, for the fallback kill
        )
        try:
            _wait_healthy(process, port, log)
            yield Server(port, process.pid)
        finally:
            _stop(process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /healthz within 60 s:\n{_tail(log)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:])


def create_accounts(url: str) -> None:
    """A public client, a cheap-hash user for set-up and production-hash users for logins."""
    with open_pool(url, max_size=1) as pool:
        Accounts(pool, CHEAP_HASHER).add_client(CLIENT, None, ("password", "refresh_token"))
        Accounts(pool, CHEAP_HASHER).add_user(FAST_USER, PASSWORD, ("profile",))
        slow = Accounts(pool, PRODUCTION_HASHER)
        for n in range(LOGIN_CLIENTS):
            slow.add_user(f"bench-slow-{n}", PASSWORD, ("profile",))


# -- the load generator: asyncio, one keep-alive HTTP/1.1 connection per client -----------------


class Connection:
    """Just enough HTTP/1.1 for small requests answered with a Content-Length body (or none)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self.port)
        return self._streams

    async def post(self, path: str, form: str, headers: str = "") -> tuple[int, bytes]:
        headers = f"Content-Type: application/x-www-form-urlencoded\r\n{headers}"
        return await self.request("POST", path, headers, form.encode())

    async def request(
        self, method: str, path: str, headers: str = "", body: bytes = b""
    ) -> tuple[int, bytes]:
        """One request (`headers` as CRLF-terminated lines) and its reply's status and body."""
        reader, writer = await self.open()
        sized = "" if method == "GET" else f"Content-Length: {len(body)}\r\n"
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUser-Agent: {USER_AGENT}"
            f"\r\n{headers}{sized}\r\n"
        )
        writer.write(head.encode() + body)  # no drain: a request is small and we await the reply
        status, length, close = parse_head(await reader.readuntil(b"\r\n\r\n"))
        reply = await reader.readexactly(length)
        if close:
            self.close()
        return status, reply

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    status, length, close = int(lines[0].split(b" ", 2)[1]), None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    if length is None and status in (204, 304):
        length = 0  # no body, so no Content-Length (RFC 9110 §8.6)
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
    return status, length, close


Step = Callable[[Connection], Awaitable[tuple[int, bytes]]]


async def login(conn: Connection, username: str, headers: str = "") -> tuple[int, bytes]:
    form = {"grant_type": "password", "client_id": CLIENT, "username": username}
    return await conn.post("/oauth/token", urlencode({**form, "password": PASSWORD}), headers)


async def _session(conn: Connection, signer: DpopSigner | None = None) -> str:
    status, body = await login(conn, FAST_USER, _proof_header(signer))
    if status != 200:
        raise RuntimeError(f"set-up login failed with {status}: {body[:300]!r}")
    token: str = json.loads(body)["refresh_token"]
    return token


class DpopSigner:
    """One client's ES256 DPoP key and `count` proofs for the token endpoint at `port` (whose
    issuer `serve` makes its own address), signed up front; once they are used up, each proof is
    signed when it is needed (counted in `late`)."""

    def __init__(self, port: int, count: int) -> None:
        self._uri = f"http://127.0.0.1:{port}/oauth/token"
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._jwk = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(self._key.public_key()))
        self._ready = [self._sign() for _ in range(count)]
        self.late = 0

    def proof(self) -> str:
        if self._ready:
            return self._ready.pop()
        self.late += 1
        return self._sign()

    def _sign(self) -> str:
        claims = {
            "jti": uuid.uuid4().hex,
            "htm": "POST",
            "htu": self._uri,
            "iat": int(time.time()),
        }
        headers = {"typ": "dpop+jwt", "jwk": self._jwk}
        return jwt.encode(claims, self._key, algorithm="ES256", headers=headers)


def _proof_header(signer: DpopSigner | None) -> str:
    return "" if signer is None else f"DPoP: {signer.proof()}\r\n"


class Refresher:
    """One client: refreshes its session, always with the token the last response rotated to;
    with a `signer`, the session is bound to its key and each refresh carries a proof."""

    def __init__(self, token: str, signer: DpopSigner | None = None) -> None:
        self.token, self.signer = token, signer

    async def __call__(self, conn: Connection) -> tuple[int, bytes]:
        form = f"grant_type=refresh_token&client_id={CLIENT}&refresh_token={self.token}"
        status, body = await conn.post("/oauth/token", form, _proof_header(self.signer))
        if status == 200:
            self.token = json.loads(body)["refresh_token"]
        else:  # the chain is broken: carry on with a new session
            self.token = await _session(conn, self.signer)
        return status, body


async def _drive(
    server: Server, conns: Sequence[Connection], steps: Sequence[Step], name: str, seconds: float
) -> Result:
    errors: Counter[str] = Counter()
    began = time.perf_counter()
    begin, end = began + WARMUP, began + WARMUP + seconds

    async def client(step: Step, conn: Connection) -> list[Sample]:
        samples = []
        while (start := time.perf_counter()) < end:
            status, body = await step(conn)
            if status == 200:
                samples.append((start, time.perf_counter()))
            else:
                errors[f"{status} {body[:160].decode(errors='replace')}"] += 1
        return samples

    async def cpu() -> tuple[float, list[float]]:
        await asyncio.sleep(WARMUP)
        own, workers = time.process_time(), _children_cpu(server.pid)
        await asyncio.sleep(seconds)
        after = _children_cpu(server.pid)
        used = sorted((after[pid] - workers.get(pid, 0.0) for pid in after), reverse=True)
        return (time.process_time() - own) / seconds, [u / seconds for u in used[:2]]

    measuring = asyncio.create_task(cpu())
    per_client = await asyncio.gather(*(client(s, c) for s, c in zip(steps, conns, strict=True)))
    client_cpu, worker_cpu = await measuring
    samples = [sample for done in per_client for sample in done]
    figure = _figure(name, samples, begin, seconds)
    return Result(figure, errors, client_cpu, worker_cpu)


def _children_cpu(parent: int) -> dict[int, float]:
    """CPU seconds of each child process of `parent` (Linux /proc; empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == parent:  # ppid; utime and stime follow at 11 and 12
            found[int(entry.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


@contextmanager
def connections(server: Server, count: int) -> Iterator[list[Connection]]:
    conns = [Connection(server.port) for _ in range(count)]
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


async def _refresh_load(
    server: Server, clients: int, name: str, seconds: float, proofs: int | None
) -> Result:
    with connections(server, clients) as conns:
        signers = [None if proofs is None else DpopSigner(server.port, proofs) for _ in conns]
        # One client at a time: a burst of connections tends to be accepted by a single worker.
        pairs = zip(conns, signers, strict=True)
        steps = [Refresher(await _session(conn, signer), signer) for conn, signer in pairs]
        result = await _drive(server, conns, steps, name, seconds)
    result.late_proofs = sum(s.late for s in signers if s is not None)
    return result


def bench_refresh(
    server: Server, clients: int, seconds: float, what: str, proofs: int | None = None
) -> Result:
    """Refreshes by `clients` clients; with `proofs`, DPoP-bound, each client holding that many
    proofs signed before the run."""
    name = f"{what}, {clients} clients"
    return asyncio.run(_refresh_load(server, clients, name, seconds, proofs))


async def _login_load(server: Server, seconds: float) -> Result:
    def step(username: str) -> Step:
        return lambda conn: login(conn, username)

    with connections(server, LOGIN_CLIENTS) as conns:
        for conn in conns:
            await conn.open()
        steps = [step(f"bench-slow-{n}") for n in range(LOGIN_CLIENTS)]
        name = f"login, production argon2, {LOGIN_CLIENTS} clients"
        return await _drive(server, conns, steps, name, seconds)


def bench_login(server: Server, seconds: float) -> Result:
    return asyncio.run(_login_load(server, seconds))


# -- the raw-PostgreSQL baseline ------------------------------------------------------------------

# One refresh's writes as a pgbench script: each pgbench client chains its own session. The event
# row has the product's shape (payload, metadata, hashes); the rotations array grows in PostgreSQL
# (`||`) up to the ROTATIONS_KEPT most recent entries, as the service's row does. pgbench reads
# `:name` as a variable even inside a literal, hence the stream id's ':' as a literal of its own.
PGBENCH_SCRIPT = """
BEGIN;
SELECT version + 1 AS v, generation + 1 AS g FROM sessions
 WHERE session_id = 'raw-{tag}-' || :client_id::text FOR UPDATE \\gset
INSERT INTO events (stream_id, stream_type, version, type, schema_version, data, metadata,
                    occurred_at, prev_hash, hash)
VALUES ('session' || ':' || 'raw-{tag}-' || :client_id::text, 'session', :v::int,
        'RefreshTokenRotated', 1,
        jsonb_build_object('generation', :g::int, 'ip', '127.0.0.1', 'refresh_token_hash',
                           repeat('0', 64), 'user_agent', '{agent}'),
        jsonb_build_object('client_id', '{client}', 'ip', '127.0.0.1', 'request_id',
                           gen_random_uuid()::text, 'user_agent', '{agent}'),
        now(), sha256('prev'::bytea), sha256('this'::bytea));
UPDATE sessions SET version = :v::int, generation = :g,
       rotations = (CASE WHEN jsonb_array_length(rotations) >= {kept} THEN rotations - 0
                    ELSE rotations END) || jsonb_build_array(jsonb_build_object('at', now()::text,
           'ip', '127.0.0.1', 'retired_generation', :g::int - 1, 'user_agent', '{agent}'))
 WHERE session_id = 'raw-{tag}-' || :client_id::text;
COMMIT;
"""


def pgbench() -> Path | None:
    """The pgbench that ships with pgserver's PostgreSQL, or one on PATH."""
    bundled = Path(POSTGRES_BIN_PATH) / "pgbench"
    if bundled.exists():
        return bundled
    found = shutil.which("pgbench")
    return None if found is None else Path(found)


def bench_pgbench(executable: Path, url: str, clients: int, seconds: float) -> Result:
    """The raw-PostgreSQL footprint of a refresh, run by pgbench (prepared statements, one
    session per client), with every transaction's latency from its log."""
    tag = uuid.uuid4().hex[:8]
    ids = [f"raw-{tag}-{n}" for n in range(clients)]
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany(RAW_SESSION, [(sid, FAST_USER, CLIENT, USER_AGENT) for sid in ids])
    with tempfile.TemporaryDirectory(prefix="ledger-bench-pgbench-") as work:
        script = Path(work) / "refresh.sql"
        script.write_text(
            PGBENCH_SCRIPT.format(tag=tag, agent=USER_AGENT, client=CLIENT, kept=ROTATIONS_KEPT)
        )
        args = [str(executable), "--no-vacuum", "--protocol=prepared", f"--client={clients}"]
        args += [f"--jobs={min(clients, 2)}", f"--time={int(WARMUP + seconds)}", "--log"]
        args += [f"--log-prefix={work}/tx", f"--file={script}", url]
        done = subprocess.run(args, capture_output=True, text=True, check=False, cwd=work)
        if done.returncode != 0:
            raise SystemExit(f"pgbench failed: {done.stderr.strip()[-500:]}")
        latencies, window = _pgbench_log(Path(work), WARMUP)
    count = len(latencies)
    name = f"raw PostgreSQL (pgbench), {clients} clients"
    return Result(Figure(name, count, window or seconds, latencies if count > 1 else []))


def _pgbench_log(work: Path, warmup: float) -> tuple[list[float], float]:
    """The latencies (seconds) of the transactions that ended after the warm-up, and how long
    that window lasted. Each log line is `client transaction latency_us script epoch_s epoch_us`."""
    rows = []
    for log in work.glob("tx.*"):
        for line in log.read_text().splitlines():
            _, _, latency, _, epoch, micros = line.split()[:6]
            rows.append((int(epoch) + int(micros) / 1e6, int(latency) / 1e6))
    if not rows:
        return [], 0.0
    start = min(end - latency for end, latency in rows) + warmup
    kept = [(end, latency) for end, latency in rows if end >= start]
    return [latency for _, latency in kept], max(end for end, _ in kept) - start


def bench_raw(url: str, threads: int, seconds: float) -> Result:
    """One refresh's writes by hand: lock the row, insert the event, update the row, commit.

    The rotations array grows in PostgreSQL (`||`) exactly as the service's row does, so the
    row written is the same size; nothing is read back but the version and generation.
    """
    tag = uuid.uuid4().hex[:8]
    ids = [f"raw-{tag}-{n}" for n in range(threads)]
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany(RAW_SESSION, [(sid, FAST_USER, CLIENT, USER_AGENT) for sid in ids])
    size = min(threads, SERVER_POOL)
    with open_pool(url, min_size=size, max_size=size) as pool:
        samples, begin = _run_threads([_raw_worker(pool, sid) for sid in ids], seconds)
    return Result(_figure(f"raw psycopg refresh tx, {threads} threads", samples, begin, seconds))


def _raw_worker(pool: ConnectionPool, session_id: str) -> Callable[[float], list[Sample]]:
    meta = {"client_id": CLIENT, "ip": "127.0.0.1", "user_agent": USER_AGENT}

    def refresh() -> None:
        with pool.connection() as conn, conn.transaction():
            row = conn.execute(RAW_LOCK, (session_id,), prepare=True).fetchone()
            assert row is not None
            version, generation = row[0] + 1, row[1] + 1
            now = datetime.now(UTC)
            data = {"generation": generation, "ip": "127.0.0.1", "refresh_token_hash": "0" * 64}
            event = (json.dumps({**data, "user_agent": USER_AGENT}), json.dumps(meta | _rid()))
            args = (session_stream_id(session_id), version, *event, now, GENESIS, GENESIS)
            conn.execute(RAW_EVENT, args, prepare=True)
            rotation = {"at": now.isoformat(), "ip": "127.0.0.1", "user_agent": USER_AGENT}
            rotated = json.dumps([{**rotation, "retired_generation": generation - 1}])
            conn.execute(RAW_UPDATE, (version, generation, rotated, session_id), prepare=True)

    def work(end: float) -> list[Sample]:
        samples = []
        while (start := time.perf_counter()) < end:
            refresh()
            samples.append((start, time.perf_counter()))
        return samples

    return work


def _rid() -> dict[str, str]:
    return {"request_id": str(uuid.uuid4())}


def _run_threads(
    works: Sequence[Callable[[float], list[Sample]]], seconds: float
) -> tuple[list[Sample], float]:
    barrier = threading.Barrier(len(works) + 1)
    window: list[float] = []
    results: list[list[Sample]] = [[] for _ in works]

    def run(n: int) -> None:
        barrier.wait()
        results[n] = works[n](window[1])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(works))]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    window.extend([began + WARMUP, began + WARMUP + seconds])
    barrier.wait()
    for thread in threads:
        thread.join()
    return [sample for done in results for sample in done], window[0]


# -- the run --------------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError("--seconds must be more than zero")
    return seconds


def _levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are positive whole numbers, e.g. 1,16,64")
    return levels


def api_command(executable: Path | None = None) -> list[str]:
    """`session-ledger serve` of this environment, or of another build's `executable`."""
    executable = executable or Path(sys.executable).with_name("session-ledger")
    if not executable.exists():
        raise SystemExit(f"{executable} is missing: install the project (pip install -e .)")
    return [str(executable), "serve"]


def _trivial_command() -> list[str]:
    app = ["bench.trivial_app:app", "--app-dir", str(ROOT), "--log-level", "info"]
    app += ["--http", "api.http.transport:NoDelayHttpToolsProtocol", "--loop", "uvloop"]
    app += ["--no-access-log"]  # as `serve` runs it
    return [sys.executable, "-m", "uvicorn", *app]


def progress(text: str) -> None:
    print(f"… {text}", file=sys.stderr, flush=True)


def run(
    url: str, levels: list[int], seconds: float, logs: Path, serve: Path | None = None
) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {
        "raw": [],
        "refresh": [],
        "dpop": [],
        "trivial": [],
        "login": [],
    }
    executable = pgbench()
    for level in levels:
        progress(f"raw PostgreSQL baseline, {level} clients")
        if executable is None:  # no pgbench: the same transaction from a psycopg loop
            results["raw"].append(bench_raw(url, level, seconds))
        else:
            results["raw"].append(bench_pgbench(executable, url, level, seconds))
    create_accounts(url)
    env = {**os.environ, **SERVER_ENV, "LEDGER_DATABASE_URL": url}
    with serving(api_command(serve), env, logs / "api.log") as api:
        for level in levels:
            progress(f"refresh, {level} clients")
            plain = bench_refresh(api, level, seconds, "refresh via HTTP")
            results["refresh"].append(plain)
            # Enough proofs for the plain rate and a margin: DPoP should be no faster.
            proofs = int(plain.figure.rate * (WARMUP + seconds) * 1.5 / level) + 20
            progress(f"DPoP refresh, {level} clients ({proofs} proofs each signed first)")
            results["dpop"].append(bench_refresh(api, level, seconds, "DPoP refresh", proofs))
        progress("login")
        results["login"].append(bench_login(api, seconds))
    with serving(_trivial_command(), dict(os.environ), logs / "trivial.log") as trivial:
        for level in levels:
            progress(f"trivial endpoint, {level} clients")
            results["trivial"].append(bench_refresh(trivial, level, seconds, "trivial FastAPI"))
    return results


def report(results: dict[str, list[Result]], levels: list[int]) -> None:
    for n, _ in enumerate(levels):
        raw, ours, trivial = results["raw"][n], results["refresh"][n], results["trivial"][n]
        print(raw.line())
        print(trivial.line())
        print(ours.line(raw))
        print(results["dpop"][n].line(ours))  # its baseline: the plain refresh
    print(results["login"][0].line())
    errors = sum((r.errors for rs in results.values() for r in rs), Counter[str]())
    for text, count in errors.most_common(10):
        print(f"  {count:>6} x {text}")
    print()
    for line in verdict(results, levels):
        print(line)


def combined_floor(raw: float, floor: float) -> float:
    """The rate if one refresh did the raw PostgreSQL work and the framework floor's work on the
    same cores: 1 / (1/raw + 1/floor)."""
    return 0.0 if raw <= 0 or floor <= 0 else 1 / (1 / raw + 1 / floor)


def verdict(results: dict[str, list[Result]], levels: list[int]) -> list[str]:
    ours, lines = results["refresh"], []
    for n, level in enumerate(levels):
        floor = combined_floor(results["raw"][n].figure.rate, results["trivial"][n].figure.rate)
        share = ours[n].figure.rate / floor if floor else 0.0
        lines.append(
            f"combined floor, {level} clients: {floor:,.0f}/s; refresh reaches {share:.0%}"
        )
    if 16 in levels:
        n = levels.index(16)
        floor = combined_floor(results["raw"][n].figure.rate, results["trivial"][n].figure.rate)
        share = ours[n].figure.rate / floor if floor else 0.0
        lines.append(
            target(share >= 0.5, f"≥ 50% of the combined floor at 16 clients: {share:.0%}")
        )
        slowest = p99(ours[n].figure.latencies)
        lines.append(target(slowest < 0.025, f"p99 < 25 ms at 16 clients: {slowest * 1000:.1f} ms"))
        dpop = results["dpop"][n].figure.rate
        cost = ours[n].figure.rate / dpop - 1 if dpop else float("inf")
        text = f"a DPoP refresh costs < 25% over a plain one at 16 clients: {cost:+.0%}"
        lines.append(target(cost < 0.25, text))
    else:
        lines.append("not measured: the targets at 16 clients (16 is not in --levels)")
    if 64 in levels:
        result = ours[levels.index(64)]
        slowest, errors = p99(result.figure.latencies), sum(result.errors.values())
        met = errors == 0 and slowest < 0.1
        text = f"64 clients: no error and p99 < 100 ms: {errors} errors, {slowest * 1000:.1f} ms"
        lines.append(target(met, text))
    else:
        lines.append("not measured: the target at 64 clients (64 is not in --levels)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LEDGER_DATABASE_URL"))
    parser.add_argument("--seconds", type=_seconds, default=5.0, help="measured seconds per figure")
    parser.add_argument("--levels", type=_levels, default=[1, 16, 64], help="e.g. 1,16,64")
    parser.add_argument(
        "--serve",
        type=Path,
        help="the session-ledger executable to measure (another build's, to compare)",
    )
    args = parser.parse_args()

    with scratch_run(args.url) as (url, logs):
        with psycopg.connect(url) as conn:
            version = conn.info.server_version
        print(f"PostgreSQL {version // 10000}.{version % 10000}, {os.cpu_count()} cores,")
        print(f"{args.seconds:g} s per figure after {WARMUP:g} s warm-up,", end=" ")
        print(f"load average {load_average()}")
        sys.stdout.flush()  # before the progress lines on stderr
        results = run(url, args.levels, args.seconds, logs, args.serve)
        report(results, args.levels)


if __name__ == "__main__":
    main()
