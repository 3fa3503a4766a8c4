"""The per-address login rate limit, shared by every worker process through PostgreSQL.

The rule is GCRA (the generic cell rate algorithm), which behaves as a token bucket: an address
may make `limit` login attempts at once, and after that one every `window / limit`. A row holds
an address's theoretical arrival time (`tat`): the moment its bucket is full again. Every
attempt counts, successful or not, and a refused one is answered before any password is hashed,
so a flood from one address costs one short transaction per request. It complements the lockout
of a user name (failures per principal), which a spray across many names does not trip.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg_pool import ConnectionPool

from api.errors import TooManyAttempts
from ledger.db import translated_errors


@dataclass(frozen=True)
class RateLimit:
    """`limit` attempts at once, refilling at `limit` per `window`."""

    limit: int = 30
    window: timedelta = timedelta(minutes=1)

    @property
    def interval(self) -> timedelta:
        return self.window / self.limit


@dataclass(frozen=True)
class Decision:
    """One attempt's outcome: the address's new `tat`, and how long to wait if refused."""

    tat: datetime
    retry_after: timedelta

    @property
    def is_admitted(self) -> bool:
        return self.retry_after <= timedelta(0)


def admit(tat: datetime | None, now: datetime, rule: RateLimit) -> Decision:
    """Decide one attempt at `now` by an address whose bucket is full again at `tat`."""
    start = now if tat is None or tat < now else tat
    wait = start - now - rule.interval * (rule.limit - 1)
    if wait > timedelta(0):
        return Decision(start, wait)
    return Decision(start + rule.interval, timedelta(0))


def address_key(ip: str | None) -> str:
    """What one rate limit covers: an IPv4 address, or an IPv6 /64 (one subscriber's usual
    allocation, so that rotating through it gains nothing)."""
    if ip is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:100]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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
