"""The expiry sweeper: every idle or absolute expiry becomes an event within seconds of its
deadline, dated at the deadline, whether or not anyone touches the session again.

It decides with the same fold and decider as a live request (session.decide_expiry), so a replay
and the live state agree, and the session-end feed announces an expiry as it does a logout. Each
pass locks a batch of due session rows (skipping those a request holds; that request records the
end itself) and ends them in one transaction, under a transaction-level advisory lock that makes
one sweeper active at a time across every process; the others find it taken and skip the pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from psycopg_pool import ConnectionPool

from ledger.db import translated_errors
from ledger.periodic import Periodic
from ledger.store import EventStore
from projections import session
from projections.sql.inline import apply_session_decision, due_sessions

SWEEP_LOCK = (7261004, 1)
"""The advisory lock (two-key form) the active sweeper holds for each pass."""
SWEEPER = {"request_id": "expiry-sweeper", "user_agent": "session-ledger expiry sweeper"}
"""The metadata of the sweeper's events."""

_log = logging.getLogger("session_ledger.expiry")


class ExpirySweeper(Periodic):
    """`sweep` for one pass; `run` (or `start`, in a thread) sweeps every interval until
    `stop`."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        clock: Callable[[], datetime],
        policy: session.Policy,
        interval_seconds: float = 1.0,
        batch_size: int = 500,
    ) -> None:
        super().__init__(interval_seconds, name="expiry-sweeper", log=_log)
        self._pool = pool
        self._store = EventStore(pool)
        self._clock = clock
        self._policy = policy
        self._batch_size = batch_size

    def sweep(self) -> int:
        """End every session whose deadline has passed; the count ended by this pass (0 when
        another sweeper holds the lock)."""
        ended = 0
        while True:
            with translated_errors(), self._pool.connection() as conn, conn.transaction():
                lock = "SELECT pg_try_advisory_xact_lock(%s, %s)"
                if conn.execute(lock, SWEEP_LOCK).fetchone() != (True,):
                    return ended  # another sweeper is active
                batch = due_sessions(conn, self._clock(), self._policy, self._batch_size)
                ended_now = 0
                for state in batch:
                    # As a request would decide: never before the stream's last event.
                    now = max(self._clock(), session.last_event_at(state))
                    decision = session.decide_expiry(state, now, self._policy)
                    meta = {**SWEEPER, "client_id": state.client_id}
                    apply_session_decision(self._store, conn, state, decision, meta)
                    ended_now += bool(decision.events)
            ended += ended_now
            if len(batch) < self._batch_size or ended_now == 0:
                return ended

    def one_pass(self) -> int:
        return self.sweep()
