"""uvicorn's HTTP/1.1 protocol with Nagle's algorithm turned off on every connection.

With `--workers`, uvicorn creates its listening socket in a way that keeps asyncio from setting
TCP_NODELAY, so each response after the first on a keep-alive connection waits for the client's
delayed ACK (about 40 ms). `serve` names this class as uvicorn's `http` protocol.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import suppress

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
