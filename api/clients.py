"""Client authentication (RFC 6749 §2.3.1), guarded against guessing.

A request that presents a client secret is admitted only while its address has attempts left
(the login throttle's bucket, api.throttle) and its client id is not locked. Every failure is an
event on the client id's stream (`ClientAuthenticationFailed`, and `ClientLocked` when it is one
too many within the window) and takes one attempt from the address's bucket. A secret is checked
by its keyed hash (api.accounts), with the same work for an unknown client id as for a known one.
A public client presents no secret and passes none of this: its id is no credential.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool

from api.accounts import Accounts, Client, ClientDirectory, is_account_name
from api.errors import InvalidClient, TooManyAttempts
from api.ratelimit import RateLimit, address_key, admit
from api.sessions import Failure, RequestInfo, record_failure
from api.throttle import AddressThrottle
from ledger.db import translated_errors
from ledger.store import EventStore
from projections.principal import LOCKED, LockoutPolicy
from projections.sql.inline import load_principal

BAD_CLIENT = "unknown client or bad credentials"

# One round trip: the address's bucket and the client's lock, read without locking either.
_ADMISSION = (
    "SELECT (SELECT tat FROM login_throttle WHERE address = %s),"
    " (SELECT locked_until FROM client_lockouts WHERE name = %s)"
)


class ClientAuthentication:
    """Authenticates the client a request names (see the module's docstring)."""

    def __init__(
        self,
        pool: ConnectionPool,
        apool: AsyncConnectionPool[Any],
        clients: ClientDirectory,
        accounts: Accounts,
        *,
        lockout: LockoutPolicy,
        per_address: RateLimit,
        clock: Callable[[], datetime],
    ) -> None:
        self._pool = pool
        self._apool = apool
        self._clients = clients
        self._accounts = accounts
        self._store = EventStore(pool)
        self._lockout = lockout
        self._throttle = AddressThrottle(pool, per_address)
        self._per_address = per_address
        self._clock = clock

    async def authenticate(self, client_id: str, secret: str | None, info: RequestInfo) -> Client:
        """The registered client, if the request authenticates as it; else InvalidClient (or
        TooManyAttempts for an address out of attempts)."""
        # An id no client can have (it could be 16 KiB long) is looked up nowhere.
        possible = is_account_name(client_id)
        client = await self._clients.client(client_id) if possible else None
        if secret is None:
            if client is None or client.is_confidential:
                raise InvalidClient(BAD_CLIENT)
            return client
        await self._admit(client_id if possible else None, info)
        if not possible:  # it counts against the address, and names no stream
            await asyncio.to_thread(self._throttle.take, info.ip, self._clock())
            raise InvalidClient(BAD_CLIENT)
        if client is not None and client.has_legacy_secret:
            accepted = await asyncio.to_thread(self._accounts.check_legacy_secret, client, secret)
        else:
            accepted = self._accounts.check_secret(client, secret)
        if accepted and client is not None:
            return client
        reason = "unknown_client" if client is None else "wrong_secret"
        if client is not None and not client.is_confidential:
            reason = "not_confidential"
        await asyncio.to_thread(self._record, client_id, reason, info)
        raise InvalidClient(BAD_CLIENT)

    async def _admit(self, client_id: str | None, info: RequestInfo) -> None:
        """Refuse before any secret is checked: 429 for an address out of attempts, 401 (and a
        `locked` failure) for a locked client; `client_id` None checks the address alone."""
        now = self._clock()
        with translated_errors():
            async with self._apool.connection() as conn:
                cursor = await conn.execute(
                    _ADMISSION, (address_key(info.ip), client_id), prepare=True
                )
                row = await cursor.fetchone()
        tat, locked_until = row if row is not None else (None, None)
        decision = admit(tat, now, self._per_address)
        if not decision.is_admitted:
            raise TooManyAttempts(
                "too many failed attempts from this address", decision.retry_after
            )
        if client_id is not None and locked_until is not None and now < locked_until:
            await asyncio.to_thread(self._record, client_id, LOCKED, info)
            raise InvalidClient(BAD_CLIENT)

    def _record(self, client_id: str, reason: str, info: RequestInfo) -> None:
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            state = load_principal(conn, client_id, for_update=True, table="client_lockouts")
            now = self._clock()  # read under the lock, so the client's events stay in order
            failure = Failure(reason, info, now)
            record_failure(self._store, conn, state, failure, self._lockout, client=True)
        self._throttle.take(info.ip, now)
