"""The DPoP `jti` replay check (RFC 9449 §11.1), shared by every worker and server through
PostgreSQL's `dpop_proofs`, with bounded storage and no DELETE.

A proof's (key thumbprint, jti) is inserted once in its time slot: its `iat` divided by the
slot length, the acceptance window plus the allowed skew. A proof is accepted only with `iat`
within a slot of now, so only the slots just before, at and after now's can hold proofs still
accepted; they live in three of four partitions (slot mod 4). `prune` empties the fourth, two
slots old, with TRUNCATE. Servers whose clocks differ by less than a slot agree on all of this.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from api.dpop import Proof
from ledger.clock import require_aware
from ledger.db import translated_errors
from ledger.periodic import Periodic

PARTITIONS = 4
REPLAYED = "this DPoP proof was presented before (its jti is used)"
_INSERT = (
    "INSERT INTO dpop_proofs (part, slot, jkt, jti) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING RETURNING true"
)

_log = logging.getLogger("session_ledger.dpop")


class ProofReplay:
    """`first_use` for each proof a request presents; `prune` to keep storage bounded."""

    def __init__(
        self, apool: AsyncConnectionPool[Any], pool: ConnectionPool, slot: timedelta
    ) -> None:
        self._apool, self._pool = apool, pool
        self._slot = slot.total_seconds()

    def slot_of(self, moment: datetime) -> int:
        require_aware(moment, "moment")
        return math.floor(moment.timestamp() / self._slot)

    async def first_use(self, proof: Proof) -> bool:
        """True the first time the proof's key and jti are presented in its slot, across every
        worker; False for a replay."""
        with translated_errors():
            async with self._apool.connection() as conn:
                taken = await (await self.queue_first_use(conn, proof)).fetchone()
        return taken is not None

    async def queue_first_use(
        self, conn: AsyncConnection[TupleRow], proof: Proof
    ) -> AsyncCursor[TupleRow]:
        """first_use in `conn`'s transaction, queued when it is pipelined: the cursor's row is
        there the first time. A refresh takes its proof so, with its row lock and in the same
        commit; rolled back, the proof stays unused (a retry may present it again)."""
        slot = self.slot_of(proof.issued_at)
        params = (slot % PARTITIONS, slot, proof.jkt, proof.jti)
        return await conn.execute(_INSERT, params, prepare=True)

    def prune(self, now: datetime) -> bool:
        """Empty the partition whose proofs are two slots old or older; whether it held any."""
        table = sql.Identifier(f"dpop_proofs_{(self.slot_of(now) - 2) % PARTITIONS}")
        with translated_errors(), self._pool.connection() as conn:
            held = conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(table)).fetchone()
            if held != (True,):
                return False
            conn.execute(sql.SQL("TRUNCATE {}").format(table))
        return True


class ProofPruner(Periodic):
    """`ProofReplay.prune` every interval, in a thread of its own."""

    def __init__(
        self, replay: ProofReplay, clock: Callable[[], datetime], interval_seconds: float
    ) -> None:
        super().__init__(interval_seconds, name="dpop-proof-pruner", log=_log)
        self._replay, self._clock = replay, clock

    def one_pass(self) -> bool:
        return self._replay.prune(self._clock())
