"""uvicorn's compiled HTTP/1.1 protocol (httptools) with Nagle's algorithm turned off on every
connection, and an access log without query strings.

With `--workers`, uvicorn hands each worker a listening socket that keeps asyncio from setting
TCP_NODELAY on the connections it accepts, so each response after the first on a keep-alive
connection would wait for the client's delayed ACK (about 40 ms). `serve` names this class as
uvicorn's `http` protocol.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from contextlib import suppress
from typing import Any

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


class WithoutQueryString(logging.Filter):
    """Drops the query string from uvicorn's access-log lines (`LEDGER_ACCESS_LOG`), which a
    careless client may have put a credential into."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = args[2].partition("?")[0]
            record.args = (args[0], args[1], path, args[3], args[4])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with WithoutQueryString on the access log."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"without_query": {"()": WithoutQueryString}}
    config["handlers"]["access"]["filters"] = ["without_query"]
    return config
