"""The session-end feed: every SessionEnded in the gap-safe order, for resource servers.

A cursor (api.cursors) is an opaque form of the end's checkpoint, so a reader that resumes after
it misses nothing and sees nothing twice. Without a cursor a reader starts with the ends recorded
within the longest access-token lifetime: an older end's tokens have all expired.

Open event streams are served by one SessionEndHub per process. It LISTENs on the ledger's
`ledger_events` channel on one connection of its own, reads each batch of new ends once, and keeps
the latest in memory for every subscriber; a subscriber behind that memory reads its pages from
the database first. Hundreds of subscribers cost no more connections than one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import sql

from api.cursors import encode_cursor
from ledger.db import connect_async, first_line
from ledger.events import SessionEnded, SessionStarted
from ledger.records import Checkpoint
from ledger.serialization import JsonValue, format_timestamp
from ledger.store import EventStore
from projections.sql.runner import CHANNEL
from projections.streams import session_id_of

PAGE = 500
"""The most ends one read returns."""
KEPT = 10_000
"""The most recent ends a hub keeps in memory."""
_MIN_READ_SECONDS = 0.05
"""Under load every commit notifies; reads are at least this far apart, so they gather."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionEnd:
    """One ended session, as the feed tells it."""

    checkpoint: Checkpoint
    sid: str
    sub: str
    client_id: str
    reason: str
    ended_at: datetime

    @property
    def cursor(self) -> str:
        return encode_cursor(self.checkpoint)

    def body(self) -> dict[str, JsonValue]:
        return {
            "sid": self.sid,
            "sub": self.sub,
            "client_id": self.client_id,
            "reason": self.reason,
            "ended_at": format_timestamp(self.ended_at),
        }


def read_ends(store: EventStore, after: Checkpoint, limit: int = PAGE) -> list[SessionEnd]:
    """The next ends after `after`, with their sessions' user and client (blocking I/O)."""
    ended = store.read_type(SessionEnded.type_name, after, limit)
    if not ended:
        return []
    starts = {e.stream_id: e.event for e in store.read_first({e.stream_id for e in ended})}
    ends = []
    for recorded in ended:
        started = starts[recorded.stream_id]
        assert isinstance(started, SessionStarted)
        assert isinstance(recorded.event, SessionEnded)
        ends.append(
            SessionEnd(
                recorded.checkpoint,
                session_id_of(recorded.stream_id),
                started.user,
                started.client_id,
                recorded.event.reason,
                recorded.occurred_at,
            )
        )
    return ends


def start_of_feed(store: EventStore, lookback: timedelta) -> Checkpoint:
    """Where a reader without a cursor starts: before every end recorded within `lookback` (the
    longest access-token lifetime), or at the horizon when there is none (blocking I/O)."""
    return store.recorded_within(SessionEnded.type_name, lookback)


class SessionEndHub:
    """Reads new ends once per process and hands them to every subscriber (`ends_after`)."""

    def __init__(
        self,
        url: str,
        store: EventStore,
        *,
        role: str | None = None,
        poll_seconds: float = 0.25,
        retry_seconds: float = 1.0,
        kept: int = KEPT,
    ) -> None:
        self._url, self._role, self._store = url, role, store
        self._poll, self._retry = poll_seconds, retry_seconds
        self._most = kept
        self._kept: list[SessionEnd] = []  # every end in (_floor, _tail], oldest first
        self._keys: list[Checkpoint] = []  # their checkpoints, for bisect
        self._floor = self._tail = Checkpoint(0, 0)
        self._news = asyncio.Event()  # set, then replaced, whenever ends are added
        self.listening = False
        self.closed = False

    async def run(self) -> None:
        """Follow the ledger until cancelled; after a failure, again from the database."""
        try:
            while True:
                try:
                    await self._listen()
                except Exception as e:  # the database, most likely: start over
                    log.warning("session-end feed not following %s: %s", CHANNEL, first_line(e))
                self.listening = False
                await asyncio.sleep(self._retry)
        finally:
            self.listening, self.closed = False, True
            self._announce()

    async def ends_after(self, after: Checkpoint, timeout: float) -> list[SessionEnd]:
        """The next ends after `after`, waiting up to `timeout` for one; [] when none came."""
        if not self.listening or after < self._floor:
            ends = await asyncio.to_thread(read_ends, self._store, after)
            if ends or self.closed:
                return ends
            if not self.listening:  # nothing will wake us: poll
                await asyncio.sleep(min(timeout, self._poll))
                return await asyncio.to_thread(read_ends, self._store, after)
        news = self._news
        ends = self._kept_after(after)
        if ends or self.closed:
            return ends
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await news.wait()
        return self._kept_after(after) if after >= self._floor else []

    async def news(self, timeout: float) -> None:
        """Return when new ends next come in, or after `timeout`."""
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._news.wait()

    def _kept_after(self, after: Checkpoint) -> list[SessionEnd]:
        first = bisect.bisect_right(self._keys, after)
        return self._kept[first : first + PAGE]

    async def _listen(self) -> None:
        async with await connect_async(self._url, role=self._role) as conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            # Listening from here on; what ended before is read from the database.
            self._tail = await asyncio.to_thread(self._store.horizon)
            self._floor = self._tail
            self._kept, self._keys = [], []
            self.listening = True
            woken = asyncio.Event()

            async def wake_on_notify() -> None:
                async for _ in conn.notifies():
                    woken.set()

            waker = asyncio.create_task(wake_on_notify())
            try:
                while not waker.done():
                    woken.clear()
                    await self._read_new()
                    await asyncio.sleep(_MIN_READ_SECONDS)
                    with suppress(TimeoutError):
                        # The poll also finds ends that were behind an open transaction when
                        # their notification came (below the horizon only later).
                        await asyncio.wait_for(woken.wait(), self._poll)
                await waker  # its failure, if it had one
            finally:
                waker.cancel()

    async def _read_new(self) -> None:
        while ends := await asyncio.to_thread(read_ends, self._store, self._tail):
            kept, keys = [*self._kept, *ends], [*self._keys, *(e.checkpoint for e in ends)]
            if len(kept) > self._most:  # the oldest leave memory: the floor rises past them
                self._floor = keys[-self._most - 1]
                kept, keys = kept[-self._most :], keys[-self._most :]
            # New lists, not changed ones: a subscriber between two awaits keeps a whole view.
            self._kept, self._keys = kept, keys
            self._tail = ends[-1].checkpoint
            self._announce()
            if len(ends) < PAGE:
                return

    def _announce(self) -> None:
        """Wake every subscriber waiting for news; later ones wait for the next."""
        news, self._news = self._news, asyncio.Event()
        news.set()
