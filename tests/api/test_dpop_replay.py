"""The DPoP jti replay check across workers, and its bounded storage (api/dpop_replay.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from psycopg_pool import ConnectionPool

from api.dpop import Proof
from api.dpop_replay import ProofReplay
from ledger.db import RUNTIME_ROLE, open_async_pool, open_pool

SLOT = timedelta(seconds=65)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _proof(jti: str, at: datetime = NOW) -> Proof:
    return Proof("thumbprint-of-the-key", jti, at)


def test_a_proof_is_taken_once_even_when_two_workers_race_for_it(
    db_url: str, pool: ConnectionPool
) -> None:
    async def scenario() -> list[bool]:
        # Two pools acting as the runtime role: two workers of `serve`, each with its own.
        first = await open_async_pool(db_url, role=RUNTIME_ROLE)
        second = await open_async_pool(db_url, role=RUNTIME_ROLE)
        try:
            replays = [ProofReplay(p, pool, SLOT) for p in (first, second)]
            tries = [replays[i % 2].first_use(_proof("raced")) for i in range(20)]
            return list(await asyncio.gather(*tries))
        finally:
            await first.close()
            await second.close()

    taken = asyncio.run(scenario())
    assert taken.count(True) == 1


def test_another_jti_or_another_key_is_a_first_use(db_url: str, pool: ConnectionPool) -> None:
    async def scenario() -> list[bool]:
        apool = await open_async_pool(db_url, role=RUNTIME_ROLE)
        try:
            replay = ProofReplay(apool, pool, SLOT)
            return [
                await replay.first_use(_proof("a")),
                await replay.first_use(_proof("b")),
                await replay.first_use(Proof("another key", "a", NOW)),
                await replay.first_use(_proof("a")),
            ]
        finally:
            await apool.close()

    assert asyncio.run(scenario()) == [True, True, True, False]


def test_pruning_empties_only_the_partition_two_slots_old(
    db_url: str, pool: ConnectionPool
) -> None:
    async def use(replay: ProofReplay, proofs: list[Proof]) -> list[bool]:
        return [await replay.first_use(p) for p in proofs]

    async def scenario() -> tuple[bool, list[bool], bool]:
        apool = await open_async_pool(db_url, role=RUNTIME_ROLE)
        try:  # as the server runs it: the runtime role may TRUNCATE the partitions, no more
            replay = ProofReplay(apool, runtime, SLOT)
            proofs = [_proof(f"slot{k}", NOW + k * SLOT) for k in (-2, -1, 0)]
            await use(replay, proofs)
            pruned = replay.prune(NOW)
            again = await use(replay, proofs)
            return pruned, again, replay.prune(NOW)
        finally:
            await apool.close()

    with open_pool(db_url, role=RUNTIME_ROLE) as runtime:
        pruned, again, pruned_twice = asyncio.run(scenario())
    assert pruned is True
    # Two slots old: forgotten (no longer accepted anyway). The slot before and now's: replays.
    assert again == [True, False, False]
    assert pruned_twice is True  # the first_use above wrote to it again
    with pool.connection() as conn:
        row = conn.execute("SELECT count(*) FROM dpop_proofs").fetchone()
    assert row == (2,)
