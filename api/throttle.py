"""The per-address login rate limit, shared by every worker process through PostgreSQL.

The rule is GCRA (the generic cell rate algorithm), which behaves as a token bucket: an address
may make `limit` login attempts at once, and after that one every `window / limit`. A row holds
an address's theoretical arrival time (`tat`): the moment its bucket is full again. Every
attempt counts, successful or not, and a refused one is answered before any password is hashed,
so a flood from one address costs one short transaction per request. It complements the lockout
of a user name (failures per principal), which a spray across many names does not trip.
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import ConnectionPool

from api.errors import TooManyAttempts
from api.ratelimit import RateLimit, address_key, admit
from ledger.db import translated_errors

# A new address gets a row whose tat is now: a full bucket, the same as no row.
_LOCK = (
    "INSERT INTO login_throttle AS t (address, tat) VALUES (%s, %s)"
    " ON CONFLICT (address) DO UPDATE SET tat = t.tat RETURNING tat"
)


class AddressThrottle:
    """Admits or refuses login attempts per client address (see the module's docstring)."""

    def __init__(self, pool: ConnectionPool, rule: RateLimit) -> None:
        self._pool = pool
        self._rule = rule
        self._swept: datetime | None = None

    def take(self, ip: str | None, now: datetime) -> None:
        """Count one attempt from `ip`; raise TooManyAttempts when its bucket is empty."""
        key = address_key(ip)
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            # One statement creates the row or locks the existing one and reads it, so the first
            # attempts of a new address also queue on one row lock.
            row = conn.execute(_LOCK, (key, now)).fetchone()
            assert row is not None  # INSERT … RETURNING always returns the row
            decision = admit(row[0], now, self._rule)
            if decision.is_admitted:
                conn.execute(
                    "UPDATE login_throttle SET tat = %s WHERE address = %s", (decision.tat, key)
                )
        self._sweep(now)
        if not decision.is_admitted:
            raise TooManyAttempts("too many login attempts from this address", decision.retry_after)

    def _sweep(self, now: datetime) -> None:
        """Now and then, forget addresses whose bucket is full again (the same as no row)."""
        if self._swept is not None and now - self._swept < self._rule.window:
            return
        self._swept = now
        with translated_errors(), self._pool.connection() as conn:
            conn.execute("DELETE FROM login_throttle WHERE tat < %s", (now,))
