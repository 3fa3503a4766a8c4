"""Changes to clients and signing keys, announced by PostgreSQL, so that every worker drops what
it holds in memory at once.

schema.sql's triggers NOTIFY `ledger_changes` with the table's name after every statement that
changes `clients` or `signing_keys`. A ChangeFollower listens on a connection of its own. While
it is not listening (at start, after a cut connection) it says so through `listening`, and the
caches that depend on it read the database on every use instead; when it listens again it
reports that anything may have changed (`None`), since notifications sent meanwhile are lost.
A handler that fails makes it start over the same way, so no change is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from psycopg import sql

from ledger.db import connect_async, first_line

CHANNEL = "ledger_changes"
RETRY_SECONDS = 1.0
"""Pause before listening again after the connection failed or was cut."""

log = logging.getLogger(__name__)

OnChange = Callable[[str | None], Awaitable[None]]
"""Told the changed table's name, or None when anything may have changed."""


class ChangeFollower:
    def __init__(
        self,
        url: str,
        on_change: OnChange,
        *,
        role: str | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._url = url
        self._on_change = on_change
        self._role = role
        self._retry_seconds = retry_seconds
        self.listening = False

    async def run(self) -> None:
        """Listen until cancelled, again after every failure."""
        while True:
            try:
                await self._listen()
            except Exception as e:  # the database, or a handler: start over either way
                log.warning("not following %s: %s", CHANNEL, first_line(e))
            await asyncio.sleep(self._retry_seconds)

    async def _listen(self) -> None:
        async with await connect_async(self._url, role=self._role) as conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            self.listening = True
            try:
                # Listening from here on: what changed before this point is re-read by everyone.
                await self._on_change(None)
                async for notify in conn.notifies():
                    await self._on_change(notify.payload)
            finally:
                self.listening = False
