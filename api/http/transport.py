"""uvicorn's compiled HTTP/1.1 protocol (httptools) with Nagle's algorithm turned off on every
connection.

With `--workers`, uvicorn hands each worker a listening socket that keeps asyncio from setting
TCP_NODELAY on the connections it accepts, so each response after the first on a keep-alive
connection would wait for the client's delayed ACK (about 40 ms). `serve` names this class as
uvicorn's `http` protocol.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import suppress

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
