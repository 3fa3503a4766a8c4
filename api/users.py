"""Account changes that reach live sessions: removing or disabling a user, a new password, new
scopes, removing a client; and enabling a user, or lifting a user's lockout.

Each change is an event on the user's principal stream (`UserRemoved`, `PasswordChanged`,
`UserScopesChanged`), written with the account row in one transaction; then the sessions it
affects end (`SessionEnded` with reason `user_removed`, `password_changed` or `scopes_changed`).
Should that second step be cut short, a refresh re-reads the account and ends a session that
outlived its user or holds a scope the user lost (api.sessions.lost_privilege), and
`sessions revoke --user` ends the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from api.accounts import AccountError, Accounts
from api.sessions import (
    CLIENT_REMOVED,
    PASSWORD_CHANGED,
    SCOPES_CHANGED,
    USER_DISABLED,
    USER_REMOVED,
    RequestInfo,
    end_client_sessions,
    end_user_sessions,
)
from ledger.db import translated_errors
from ledger.events import (
    ClientRemoved,
    Event,
    PasswordChanged,
    PrincipalUnlocked,
    UserDisabled,
    UserEnabled,
    UserRemoved,
    UserScopesChanged,
)
from ledger.store import EventStore
from projections import principal
from projections.session import Policy
from projections.sql.inline import load_principal, save_principal
from projections.streams import client_stream, principal_stream


class UserChanges:
    """The account changes above, on the database the accounts live in (the owner's URL)."""

    def __init__(
        self,
        accounts: Accounts,
        *,
        clock: Callable[[], datetime],
        policy: Policy,
        info: RequestInfo,
    ) -> None:
        self._pool, self._accounts, self._clock = accounts.pool, accounts, clock
        self._policy, self._info = policy, info

    def remove(self, name: str) -> int:
        """Delete the user and end all their sessions; the count ended."""
        name = self._named(name)
        query = "DELETE FROM users WHERE name = %s"
        self._change(name, query, (name,), lambda at: UserRemoved(occurred_at=at))
        return self.revoke(name, USER_REMOVED)

    def set_password(self, name: str, password: str) -> int:
        """Replace the user's password and end all their sessions; the count ended."""
        name = self._named(name)
        hashed = self._accounts.password_hash(password)
        query = "UPDATE users SET password_hash = %s WHERE name = %s"
        self._change(name, query, (hashed, name), lambda at: PasswordChanged(occurred_at=at))
        return self.revoke(name, PASSWORD_CHANGED)

    def disable(self, name: str) -> int:
        """Let the user log in no more (UserDisabled) and end all their sessions; the count
        ended. The account, its password and scopes stay for `enable`."""
        name = self._named(name)
        query = "UPDATE users SET disabled = true WHERE name = %s"
        self._change(name, query, (name,), lambda at: UserDisabled(occurred_at=at))
        return self.revoke(name, USER_DISABLED)

    def enable(self, name: str) -> None:
        """Let a disabled user log in again (UserEnabled)."""
        name = self._named(name)
        query = "UPDATE users SET disabled = false WHERE name = %s"
        self._change(name, query, (name,), lambda at: UserEnabled(occurred_at=at))

    def set_scopes(self, name: str, scopes: Sequence[str]) -> int:
        """Give the user exactly `scopes`; end the sessions that hold any other; the count."""
        name = self._named(name)
        held = self._accounts.checked_scopes(scopes)
        query = "UPDATE users SET scopes = %s WHERE name = %s"

        def changed(at: datetime) -> Event:
            return UserScopesChanged(occurred_at=at, scopes=held)

        self._change(name, query, (list(held), name), changed)
        return self.revoke(name, SCOPES_CHANGED, beyond_scopes=held)

    def unlock(self, name: str) -> bool:
        """Lift the user's lockout (PrincipalUnlocked), so the next login is judged afresh;
        False when the user was not locked (nothing is recorded then)."""
        name = self._named(name)
        if self._accounts.user(name) is None:
            raise AccountError(f"user {name!r} does not exist")
        store = EventStore(self._pool)
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            state = load_principal(conn, name, for_update=True)
            now = self._clock()
            if not principal.is_locked(state, now):
                return False
            unlocked = PrincipalUnlocked(occurred_at=now)
            stream = principal_stream(name)
            store.append(stream, state.version, [unlocked], self._info.metadata(), conn=conn)
            save_principal(conn, principal.evolve(state, unlocked))
        return True

    def remove_client(self, client_id: str) -> int:
        """Delete the client (ClientRemoved on its stream) and end every session it holds
        (SessionEnded `client_removed`); the count ended."""
        store = EventStore(self._pool)
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            state = load_principal(conn, client_id, for_update=True, table="client_lockouts")
            deleted = conn.execute("DELETE FROM clients WHERE client_id = %s", (client_id,))
            if deleted.rowcount != 1:
                raise AccountError(f"client {client_id!r} does not exist")
            removed = ClientRemoved(occurred_at=self._clock())
            stream = client_stream(client_id)
            store.append(stream, state.version, [removed], self._info.metadata(), conn=conn)
            save_principal(conn, principal.evolve(state, removed), table="client_lockouts")
        return end_client_sessions(
            self._pool,
            client_id,
            CLIENT_REMOVED,
            clock=self._clock,
            policy=self._policy,
            info=self._info,
        )

    def revoke(
        self, name: str, reason: str = "revoked", *, beyond_scopes: Sequence[str] | None = None
    ) -> int:
        """End every valid session of the user (with `beyond_scopes`, those holding a scope
        outside it); the count ended. `sessions revoke --user` runs it."""
        return end_user_sessions(
            self._pool,
            self._named(name),
            reason,
            clock=self._clock,
            policy=self._policy,
            info=self._info,
            beyond_scopes=beyond_scopes,
        )

    def _named(self, name: str) -> str:
        """The user's own name for any spelling of it (Accounts.user); a user that no longer
        exists keeps the name given, whose sessions may still be ended."""
        user = self._accounts.user(name)
        return name if user is None else user.name

    def _change(
        self,
        name: str,
        query: str,
        params: tuple[object, ...],
        event: Callable[[datetime], Event],
    ) -> None:
        store = EventStore(self._pool)
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            state = load_principal(conn, name, for_update=True)
            if conn.execute(query, params).rowcount != 1:
                raise AccountError(f"user {name!r} does not exist")
            changed = event(self._clock())
            store.append(
                principal_stream(name), state.version, [changed], self._info.metadata(), conn=conn
            )
            save_principal(conn, principal.evolve(state, changed))
