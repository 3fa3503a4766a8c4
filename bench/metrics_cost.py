"""What measuring request latency costs per request: the /metrics middleware with
prometheus_client (one process, and the multiprocess mode `serve --workers N` uses), beside the
framework floor and the hand-written histogram it replaced.

    python -m bench.metrics_cost                 # 20,000 requests per round, 7 rounds
    python -m bench.metrics_cost --requests 5000 --rounds 3

Each variant runs in its own process (prometheus_client picks its storage at import) and drives
the same FastAPI app in-process through ASGI, with no socket, so that the middleware's share is
not lost in network noise. The figure is the median of the rounds, in microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

VARIANTS = ("floor", "hand-written", "prometheus_client", "prometheus_client multiprocess")


class HandWritten:
    """The per-process histogram /metrics used before prometheus_client (until commit 9404e7a)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], list[float]] = {}

    def labels(self, route: str, method: str, status: str) -> HandWritten._Series:
        return HandWritten._Series(self, (route, method, status))

    class _Series:
        def __init__(self, owner: HandWritten, key: tuple[str, str, str]) -> None:
            self._owner, self._key = owner, key

        def observe(self, seconds: float) -> None:
            owner = self._owner
            with owner._lock:
                counts = owner._series.setdefault(self._key, [0.0] * (len(owner.BUCKETS) + 2))
                counts[bisect.bisect_left(owner.BUCKETS, seconds)] += 1
                counts[-1] += seconds


def _app(variant: str) -> Any:
    from fastapi import FastAPI, Response

    from api.http import edge, metrics

    app = FastAPI()

    @app.post("/oauth/token")
    async def token() -> Response:
        return Response(b"{}", media_type="application/json")

    if variant == "hand-written":
        edge.install(app, HandWritten())  # type: ignore[arg-type]  # same labels/observe
    elif variant != "floor":
        edge.install(app, metrics.latency_histogram())
    return app


async def _requests(app: Any, count: int) -> float:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/oauth/token",
        "raw_path": b"/oauth/token",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    started = time.perf_counter()
    for _ in range(count):
        await app(dict(scope), receive, send)
    return time.perf_counter() - started


def _measure(variant: str, count: int, rounds: int) -> float:
    """Microseconds per request, the median of `rounds` (after one warm-up round)."""
    app = _app(variant)
    asyncio.run(_requests(app, count // 4))
    seconds = [asyncio.run(_requests(app, count)) for _ in range(rounds)]
    return statistics.median(seconds) / count * 1e6


def _child(variant: str, count: int, rounds: int) -> float:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
        if variant.endswith("multiprocess"):
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        args = [sys.executable, "-m", "bench.metrics_cost", "--child", variant]
        args += ["--requests", str(count), "--rounds", str(rounds)]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["microseconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"microseconds": _measure(args.child, args.requests, args.rounds)}))
        return
    figures = {v: _child(v, args.requests, args.rounds) for v in VARIANTS}
    floor = figures["floor"]
    print(f"{args.requests:,} in-process requests per round, median of {args.rounds} rounds")
    for variant, micros in figures.items():
        extra = f"   +{micros - floor:5.1f} µs, {micros / floor:.2f} of the floor"
        share = "" if variant == "floor" else extra
        print(f"  {variant:32} {micros:7.1f} µs/request{share}")


if __name__ == "__main__":
    main()
