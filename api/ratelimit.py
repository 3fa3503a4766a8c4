"""The per-address login rate limit's rule, GCRA (the generic cell rate algorithm), as a pure
decision; `api.throttle` keeps its state in PostgreSQL."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RateLimit:
    """`limit` attempts at once, refilling at `limit` per `window`."""

    limit: int = 30
    window: timedelta = timedelta(minutes=1)

    @property
    def interval(self) -> timedelta:
        return self.window / self.limit


@dataclass(frozen=True)
class Admission:
    """One attempt's outcome: the address's new `tat`, and how long to wait if refused."""

    tat: datetime
    retry_after: timedelta

    @property
    def is_admitted(self) -> bool:
        return self.retry_after <= timedelta(0)


def admit(tat: datetime | None, now: datetime, rule: RateLimit) -> Admission:
    """Decide one attempt at `now` by an address whose bucket is full again at `tat`."""
    start = now if tat is None or tat < now else tat
    wait = start - now - rule.interval * (rule.limit - 1)
    if wait > timedelta(0):
        return Admission(start, wait)
    return Admission(start + rule.interval, timedelta(0))


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
