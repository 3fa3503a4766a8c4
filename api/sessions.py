"""The session use cases: load state, decide, append events and the projection row, issue tokens.

Every decision happens in one PostgreSQL transaction that holds the session's (or principal's)
projection row lock, so any number of workers behave like one.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from api.accounts import Accounts, Client, ClientDirectory, User, normal_name
from api.dpop import DEFAULT_SKEW, Proof
from api.dpop_replay import REPLAYED, ProofReplay
from api.errors import (
    DpopBindingRefused,
    InvalidDpopProof,
    InvalidGrant,
    InvalidScope,
    InvalidToken,
)
from api.keys import KEY_CHANGE_MARGIN, KeyRing, Sealer, load_keyring, load_server_secret
from api.settings import Settings
from api.throttle import AddressThrottle
from api.tokens import (
    AccessClaims,
    issue_access_token,
    new_session_id,
    parse_refresh_token,
    refresh_token,
    refresh_token_hash,
    verify_access_token,
)
from ledger.db import translated_errors
from ledger.errors import ConcurrencyConflict
from ledger.events import (
    AuthorizationCodeIssued,
    AuthorizationCodeRedeemed,
    AuthorizationCodeRefused,
    AuthorizationCodeReplayed,
    BrowserRequestRefused,
    ClientCredentialsGranted,
    Event,
)
from ledger.serialization import format_timestamp
from ledger.store import EventStore, PipelinedTransaction, Stream, pipelined
from projections import code as codes
from projections import principal, session
from projections.code import code_hash
from projections.session import Decision, Outcome, SessionState
from projections.sql.inline import (
    apply_session_decision,
    load_principal,
    load_session,
    load_session_async,
    lock_session_with_holder_async,
    save_principal,
    save_session,
    save_session_async,
    valid_client_sessions,
    valid_user_sessions,
)
from projections.streams import (
    client_stream,
    code_stream,
    principal_stream,
    refusal_stream,
    session_stream,
)

Connection = psycopg.Connection[TupleRow]

_REFUSALS = {
    Outcome.ENDED: "the session has ended",
    Outcome.IDLE_TIMEOUT: "the session expired after inactivity",
    Outcome.ABSOLUTE_TIMEOUT: "the session reached its maximum lifetime",
    Outcome.REUSE_DETECTED: "refresh token reuse detected; the session is revoked",
    Outcome.UNKNOWN_GENERATION: "the refresh token is not valid",
}
_DPOP_REFUSALS = {
    "missing": "this session is bound to a DPoP key: send a DPoP proof signed by it",
    "another_key": "the DPoP proof is not signed by the key this session is bound to",
}
# Why a token was refused against its binding, by (token unbound, no proof).
_BINDING_REFUSALS = {
    (False, True): "this access token is DPoP-bound: use the DPoP scheme with a proof",
    (True, False): "this access token is not DPoP-bound: use the Bearer scheme",
    (False, False): "the DPoP proof is not signed by the key this access token is bound to",
}
BAD_LOGIN = "invalid username or password"
_CODE_REFUSALS = {
    "unknown": "the authorization code is not valid",
    "expired": "the authorization code has expired",
    "client": "the authorization code was issued to another client",
    "redirect_uri": "redirect_uri is not the one the authorization code was issued for",
    "verifier": "code_verifier does not match the code_challenge (PKCE)",
    "account": "the code's user no longer holds its account or scope",
    "replayed": "the authorization code was used before; the session it started is revoked",
}
CODE_REPLAYED = "code_replayed"
"""The SessionEnded reason of a session whose authorization code was presented again."""
# SessionEnded reasons of account changes (api.users).
USER_REMOVED, PASSWORD_CHANGED = "user_removed", "password_changed"
SCOPES_CHANGED = "scopes_changed"
CLIENT_REMOVED = "client_removed"
USER_DISABLED = "user_disabled"
_LOST_PRIVILEGE = {
    USER_REMOVED: "the session's user no longer exists or is disabled; the session has ended",
    SCOPES_CHANGED: "the user no longer holds this session's scope; the session has ended",
}


def lost_privilege(state: SessionState, holder: tuple[str, ...] | None) -> str | None:
    """Why the session may not go on under its user's current account (`holder`: the scopes the
    user holds now, None when the user is gone), or None when it may."""
    if holder is None:
        return USER_REMOVED
    if not set(state.scope) <= set(holder):
        return SCOPES_CHANGED
    return None


@dataclass(frozen=True)
class RequestInfo:
    """Who is asking: recorded as event metadata and as evidence."""

    request_id: str
    ip: str | None
    user_agent: str | None
    peer: str | None = None
    """The trusted proxy the request came through, when `ip` is the address it forwarded."""

    def metadata(self, client_id: str | None = None) -> dict[str, object]:
        meta: dict[str, object] = {
            "request_id": self.request_id,
            "ip": self.ip,
            "user_agent": self.user_agent,
        }
        if self.peer is not None:
            meta["peer"] = self.peer
        return meta if client_id is None else {**meta, "client_id": client_id}


@dataclass(frozen=True)
class TokenGrant:
    """What the token endpoint returns."""

    access_token: str
    expires_in: int
    refresh_token: str | None  # None for a client's own token (client_credentials)
    scope: tuple[str, ...]
    session_expires_in: int  # seconds to the absolute end: the browser refresh cookie's Max-Age
    token_type: str = "Bearer"  # noqa: S105 (a token type, not a secret)
    """`DPoP` for an access token bound to a DPoP key (RFC 9449 §5), else `Bearer`."""


class SessionService:
    """Login, refresh, activity, logout, revocation and introspection on the ledger.

    The hot path (refresh, the bearer check, activity, introspection) runs on the event loop
    through `apool`; the rest, argon2 included, runs in threads on `pool`.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        apool: AsyncConnectionPool[Any],
        accounts: Accounts,
        clients: ClientDirectory,
        settings: Settings,
        clock: Callable[[], datetime],
        sealer: Sealer,
    ) -> None:
        self._pool = pool
        self._apool = apool
        self._store = EventStore(pool)
        self._accounts = accounts
        self._clients = clients
        self._settings = settings
        self._policy = settings.policy
        self.clock = clock
        self._sealer = sealer
        self._refresh_secret = load_server_secret(pool, sealer, clock())
        self._keyring = load_keyring(pool, sealer, clock())
        self._throttle = AddressThrottle(pool, settings.address_logins)
        self.proof_replay = ProofReplay(apool, pool, slot=settings.dpop_window + DEFAULT_SKEW)

    @property
    def policy(self) -> session.Policy:
        return self._policy

    # -- keys ---------------------------------------------------------------------------------

    def keyring(self) -> KeyRing:
        return self._keyring

    def reload_keys(self) -> None:
        """Re-read the signing keys: `keys rotate` announces a change (api.changes)."""
        self._keyring = load_keyring(self._pool, self._sealer, self.clock())

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        retention = self._policy.access_token_ttl + KEY_CHANGE_MARGIN
        return self.keyring().jwks(self.clock(), retention)

    # -- grants -------------------------------------------------------------------------------

    def login(
        self,
        username: str,
        password: str,
        client: Client,
        scope: str | None,
        info: RequestInfo,
        jkt: str | None = None,
    ) -> TokenGrant:
        """A new session for the user, bound to the DPoP key `jkt` when the request proved
        possession of one (RFC 9449 §5): its refreshes then need that key's proofs."""
        user, now = self._authenticate(username, password, info)
        granted = _granted_scope(user.scopes, scope)
        return self._start(user.name, client, granted, info, now, jkt)

    def authorize(
        self,
        username: str,
        password: str,
        client: Client,
        scope: str | None,
        redirect_uri: str,
        code_challenge: str,
        info: RequestInfo,
    ) -> str:
        """The login of the authorization endpoint (RFC 6749 §4.1): the same rules as `login`,
        and on success a new code for `client`, bound to `redirect_uri` and the PKCE S256
        `code_challenge`, recorded as AuthorizationCodeIssued on a stream named after its
        hash. The code itself is returned, and stored nowhere."""
        user, now = self._authenticate(username, password, info)
        granted = _granted_scope(user.scopes, scope)
        code = secrets.token_urlsafe(32)
        issued = AuthorizationCodeIssued(
            occurred_at=now,
            user=user.name,
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            scope=granted,
            expires_at=now + self._settings.code_lifetime,
            ip=info.ip,
            user_agent=info.user_agent,
        )
        self._store.append(code_stream(code_hash(code)), 0, [issued], info.metadata())
        return code

    def redeem_code(
        self,
        code: str,
        client: Client,
        redirect_uri: str,
        verifier: str,
        info: RequestInfo,
        jkt: str | None = None,
    ) -> TokenGrant:
        """grant_type=authorization_code (RFC 6749 §4.1.3, RFC 7636 §4.6): a session started
        exactly as by a login, for the code's user and scope. A refused redemption is recorded
        (AuthorizationCodeRefused); a second one ends the session the first started (§4.1.2)."""
        for _ in range(LOST_RACE_ATTEMPTS - 1):
            with suppress(ConcurrencyConflict):
                return self._redeem_once(code, client, redirect_uri, verifier, info, jkt)
        return self._redeem_once(code, client, redirect_uri, verifier, info, jkt)

    def _redeem_once(
        self,
        code: str,
        client: Client,
        redirect_uri: str,
        verifier: str,
        info: RequestInfo,
        jkt: str | None,
    ) -> TokenGrant:
        stream = code_stream(code_hash(code))
        state = codes.fold(self._store.read_stream(stream.id))
        if state is None:
            raise InvalidGrant(_CODE_REFUSALS["unknown"])
        now = self.clock()
        if state.redeemed is not None:
            self._code_replayed(stream, state, info, now)
            raise InvalidGrant(_CODE_REFUSALS["replayed"])
        reason = codes.refusal(state, client.client_id, redirect_uri, verifier, now)
        holder = self._accounts.user(state.issued.user)
        lost = (
            holder is None or holder.disabled or not set(state.issued.scope) <= set(holder.scopes)
        )
        if reason is None and lost:
            reason = "account"  # since it was issued: the user removed, disabled, or less scoped
        if reason is not None:
            refused = AuthorizationCodeRefused(
                occurred_at=now, reason=reason, ip=info.ip, user_agent=info.user_agent
            )
            self._store.append(stream, state.version, [refused], info.metadata(client.client_id))
            raise InvalidGrant(_CODE_REFUSALS[reason])
        session_id = new_session_id()
        redeemed = AuthorizationCodeRedeemed(
            occurred_at=now, session_id=session_id, ip=info.ip, user_agent=info.user_agent
        )
        return self._start(
            state.issued.user,
            client,
            state.issued.scope,
            info,
            now,
            jkt,
            session_id=session_id,
            also=(stream, state.version, redeemed),
        )

    def _code_replayed(
        self, stream: Stream, state: codes.CodeState, info: RequestInfo, now: datetime
    ) -> None:
        """Record the replay, then end the session the code's redemption started."""
        first = state.redeemed
        assert first is not None
        assert state.redeemed_at is not None
        replayed = AuthorizationCodeReplayed(
            occurred_at=now,
            session_id=first.session_id,
            first_use={
                "at": format_timestamp(state.redeemed_at),
                "ip": first.ip,
                "user_agent": first.user_agent,
            },
            ip=info.ip,
            user_agent=info.user_agent,
        )
        self._store.append(stream, state.version, [replayed], info.metadata())
        self._decide(
            first.session_id,
            info,
            lambda s, at: session.decide_end(s, CODE_REPLAYED, at, self._policy),
        )

    def _authenticate(
        self, username: str, password: str, info: RequestInfo
    ) -> tuple[User, datetime]:
        """The user the name and password prove, and when; InvalidGrant otherwise, the failure
        recorded first. The address throttle, the lockout and the unknown-user timing hold for
        every way of logging in."""
        self._throttle.take(info.ip, self.clock())
        user = self._accounts.user(username)
        # Every spelling of a name (in any case, or full-width) shares one principal and lockout.
        name = normal_name(username) if user is None else user.name
        refusal = None
        with self._transaction() as conn:
            # The principal row lock makes parallel guesses queue, so none slips past a lockout.
            state = load_principal(conn, name, for_update=True)
            now = self.clock()  # read under the lock, so the principal's events stay in order
            if principal.is_locked(state, now):
                refusal = principal.LOCKED, "too many failed logins; try again later"
            # SECURITY: an unknown user's password is verified too (against a stand-in hash),
            # so the time to answer does not tell which user names exist.
            elif not self._accounts.check_password(user, password):
                refusal = "unknown_user" if user is None else "wrong_password", BAD_LOGIN
            elif user is not None and user.disabled:  # told apart only in the record
                refusal = "disabled", BAD_LOGIN
            if refusal is not None:
                failure = Failure(refusal[0], info, now)
                record_failure(self._store, conn, state, failure, self._settings.lockout)
        if refusal is not None or user is None:  # the failure is committed before refusing
            raise InvalidGrant(refusal[1] if refusal else BAD_LOGIN)
        return user, now

    def _start(
        self,
        user: str,
        client: Client,
        scope: tuple[str, ...],
        info: RequestInfo,
        now: datetime,
        jkt: str | None,
        *,
        session_id: str | None = None,
        also: tuple[Stream, int, Event] | None = None,
    ) -> TokenGrant:
        """A new session's SessionStarted and row, with `also` (an event on another stream at
        its expected version) in the same transaction."""
        session_id = session_id or new_session_id()
        token = refresh_token(self._refresh_secret, session_id, 1)
        started = session.start(
            user=user,
            client_id=client.client_id,
            scope=scope,
            refresh_token_hash=refresh_token_hash(token),
            ip=info.ip,
            user_agent=info.user_agent,
            now=now,
            jkt=jkt,
        )
        with self._transaction() as conn:
            if also is not None:
                stream, version, event = also
                self._store.append(stream, version, [event], info.metadata(), conn=conn)
            self._store.append(_stream(session_id), 0, [started], info.metadata(), conn=conn)
            state_after = session.evolve(None, session_id, started)
            save_session(conn, state_after)
        return self._grant(state_after, token, now, jkt)

    async def refresh(
        self,
        token: str,
        client: Client,
        info: RequestInfo,
        proof: Proof | None = None,
        scope: str | None = None,
    ) -> TokenGrant:
        """Rotate the refresh token. `proof` is the request's DPoP proof, checked but not yet
        taken: the refresh takes its jti (RFC 9449 §11.1) in its own transaction. A session bound
        to a key is refreshed only with that key's proof (§5); any other try is refused and
        recorded (DpopProofRefused). A `scope` (RFC 6749 §6) must be the session's own, as
        clients such as Authlib send it: a session's scope never changes."""
        session_id, generation = self._parse_refresh(token)
        return await _retried(
            lambda: self._refresh(session_id, generation, client, info, proof, scope)
        )

    async def _refresh(
        self,
        session_id: str,
        generation: int,
        client: Client,
        info: RequestInfo,
        proof: Proof | None,
        scope: str | None,
    ) -> TokenGrant:
        # The successor; a retry in grace gets it again, as the presented token's successor is
        # then the session's current token (tokens are a MAC of session id and generation).
        next_token = refresh_token(self._refresh_secret, session_id, generation + 1)
        jkt = None if proof is None else proof.jkt
        async with pipelined(self._apool) as tx:
            # The proof's jti first, in the same round trip as the row lock and the same commit
            # as the rotation. Taken before any row lock, it cannot join a deadlock: a second
            # use of one proof waits for the first's commit holding nothing.
            used = (
                None if proof is None else await self.proof_replay.queue_first_use(tx.conn, proof)
            )
            state, holder = await lock_session_with_holder_async(tx.conn, session_id)
            if used is not None and await used.fetchone() is None:
                raise InvalidDpopProof(REPLAYED)
            if state is None or state.client_id != client.client_id:
                raise InvalidGrant("the refresh token is not valid")
            if scope is not None and set(scope.split(" ")) != set(state.scope):
                raise InvalidScope("a refresh keeps the session's scope: omit scope, or repeat it")
            now = self._now(state)
            # The user's current account decides too: a session never outlives its user, nor
            # keeps a scope the user no longer holds (an account change that could not end it).
            lost = lost_privilege(state, holder)
            refused = self._decide_dpop(state, jkt, info, now)
            if refused is not None:
                decision = refused
            elif lost is not None:
                decision = session.decide_end(state, lost, now, self._policy)
            else:
                decision = session.decide_refresh(
                    state,
                    generation,
                    next_token_hash=refresh_token_hash(next_token),
                    ip=info.ip,
                    user_agent=info.user_agent,
                    now=now,
                    policy=self._policy,
                )
            state = await self._apply_async(tx, state, decision, info)
        if refused is not None:  # recorded before refusing
            raise _dpop_refusal(jkt)
        if lost is not None and decision.outcome is Outcome.OK:
            raise InvalidGrant(_LOST_PRIVILEGE[lost])
        if not decision.is_granted:
            raise InvalidGrant(_REFUSALS[_refusal(decision.outcome, state)])
        return self._grant(state, next_token, now, jkt)

    def grant_client(
        self, client: Client, scope: str | None, info: RequestInfo, jkt: str | None = None
    ) -> TokenGrant:
        """RFC 6749 §4.4: an access token for the (authenticated, confidential) client itself,
        holding the client scopes asked for (all of them by default), with no session and no
        refresh token, bound to the DPoP key `jkt` when the request proved one (RFC 9449 §5).
        The grant is a ClientCredentialsGranted event on the client's stream."""
        granted = _granted_scope(client.scopes, scope, "this client")
        with self._transaction() as conn:
            state = load_principal(conn, client.client_id, for_update=True, table="client_lockouts")
            now = self.clock()
            event = ClientCredentialsGranted(
                occurred_at=now, scope=granted, ip=info.ip, user_agent=info.user_agent
            )
            stream = client_stream(client.client_id)
            self._store.append(stream, state.version, [event], info.metadata(), conn=conn)
            save_principal(conn, principal.evolve(state, event), table="client_lockouts")
        expires_at = now + self._policy.access_token_ttl
        access = issue_access_token(
            self.keyring(),
            issuer=self._settings.issuer,
            audience=self._settings.audience,
            subject=client.client_id,
            session_id=None,
            client_id=client.client_id,
            scope=granted,
            now=now,
            expires_at=expires_at,
            jkt=jkt,
        )
        seconds = int(self._policy.access_token_ttl / timedelta(seconds=1))
        token_type = "Bearer" if jkt is None else "DPoP"
        return TokenGrant(access, seconds, None, granted, seconds, token_type)

    # -- bearer calls ---------------------------------------------------------------------------

    async def verify_bearer(
        self, access_token: str, jkt: str | None = None
    ) -> tuple[AccessClaims, SessionState | None]:
        """A user's token with its session, valid now; or a client's own token, whose client
        must still be registered (its session None). Else InvalidToken. `jkt` is the key of the
        request's DPoP proof (the DPoP scheme), which a bound token needs (RFC 9449 §7)."""
        claims, state = await self._verified(access_token)
        _check_binding(claims, jkt)
        return claims, state

    async def authenticate(
        self, access_token: str, jkt: str | None = None
    ) -> tuple[AccessClaims, SessionState]:
        """The token's claims and its session, which must be valid now; else InvalidToken (`jkt`
        as for verify_bearer)."""
        now = self.clock()
        claims = self._verify(access_token, now)
        _check_binding(claims, jkt)
        return claims, await self._valid_session(claims, now)

    async def _verified(self, access_token: str) -> tuple[AccessClaims, SessionState | None]:
        """verify_bearer, whatever the token's binding."""
        now = self.clock()
        claims = self._verify(access_token, now)
        if claims.session_id is None:
            if await self._clients.client(claims.client_id) is None:
                raise InvalidToken("the token's client is no longer registered")
            return claims, None
        return claims, await self._valid_session(claims, now)

    async def _valid_session(self, claims: AccessClaims, now: datetime) -> SessionState:
        if claims.session_id is None:
            raise InvalidToken("this is a client's own token; it belongs to no session")
        state = await self._session_async(claims.session_id)
        if state is None or not session.is_valid(state, now, self._policy):
            raise InvalidToken("the session is no longer active")
        # Only a leaked signing key could make these differ; no such token is honoured.
        if (claims.subject, claims.client_id) != (state.user, state.client_id):
            raise InvalidToken("the token does not match its session")
        return state

    async def record_activity(self, state: SessionState, info: RequestInfo) -> None:
        now = self.clock()
        if now - state.last_activity < self._policy.activity_debounce:
            return  # debounced without a transaction: the common case stays read-only
        await _retried(lambda: self._record_activity(state.session_id, info))

    async def _record_activity(self, session_id: str, info: RequestInfo) -> None:
        async with pipelined(self._apool) as tx:
            locked = await load_session_async(tx.conn, session_id, for_update=True)
            if locked is not None:
                decision = session.decide_activity(locked, self._now(locked), self._policy)
                await self._apply_async(tx, locked, decision, info)

    def list_sessions(self, user: str, limit: int = 100) -> list[SessionState]:
        with self._connection() as conn:
            return valid_user_sessions(conn, user, self.clock(), self._policy, limit)

    def end_session(self, user: str, session_id: str, info: RequestInfo) -> bool:
        """End one of the user's sessions; False when it is not theirs or not active."""
        now = self.clock()
        with self._connection() as conn:
            state = load_session(conn, session_id, for_update=False)
        if state is None or state.user != user or not session.is_valid(state, now, self._policy):
            return False
        decision = self._decide(
            session_id, info, lambda s, at: session.decide_end(s, "logout", at, self._policy)
        )
        return decision is not None and decision.outcome is Outcome.OK

    def end_all(self, user: str, info: RequestInfo) -> int:
        """Log the user out everywhere; the count of sessions ended."""
        return end_user_sessions(
            self._pool, user, "logout", clock=self.clock, policy=self._policy, info=info
        )

    def record_browser_refusal(
        self, endpoint: str, reason: str, origin: str | None, info: RequestInfo
    ) -> None:
        """Record a cookie-authenticated request refused (cross-site, or with two refresh
        cookies), for the auditors."""
        event = BrowserRequestRefused(
            occurred_at=self.clock(),
            endpoint=endpoint,
            reason=reason,
            origin=None if origin is None else origin[:200],
        )
        self._store.append(refusal_stream(info.request_id), 0, [event], info.metadata())

    # -- revocation and introspection ---------------------------------------------------------

    def revoke(self, token: str, client: Client, info: RequestInfo, jkt: str | None = None) -> None:
        """RFC 7009: end the token's session; unknown or foreign tokens are ignored.

        Both kinds of token are tried, so a token_type_hint is not needed (RFC 7009 §2.1 lets a
        server ignore it). A session bound to a DPoP key is ended only with a proof by that key
        (`jkt`, the request's): any other try is refused and recorded (DpopProofRefused), as a
        refresh would be, since whoever cannot use a stolen token should not log its owner out.
        """
        session_id = self._session_of(token)
        if session_id is None:
            return
        with self._connection() as conn:
            state = load_session(conn, session_id, for_update=False)
        if state is None or state.client_id != client.client_id:
            return

        def decide(state: SessionState, at: datetime) -> Decision:
            if state.ended_at is not None:  # nothing left to revoke, nor to guard
                return session.decide_end(state, "logout", at, self._policy)
            refused = self._decide_dpop(state, jkt, info, at)
            return refused or session.decide_end(state, "logout", at, self._policy)

        decision = self._decide(session_id, info, decide)
        if decision is not None and decision.outcome is Outcome.DPOP_REFUSED:
            raise _dpop_refusal(jkt)

    async def introspect(self, token: str, hint: str | None) -> dict[str, object]:
        """RFC 7662: the token's claims when it is active, else only `active: false`."""
        now = self.clock()
        if hint != "refresh_token":
            try:
                claims, _ = await self._verified(token)  # bound or not: the caller is told
            except InvalidToken:
                pass
            else:
                return _introspection(claims, "access_token")
        return await self._introspect_refresh(token, now)

    # -- internals ----------------------------------------------------------------------------

    async def _introspect_refresh(self, token: str, now: datetime) -> dict[str, object]:
        try:
            session_id, generation = parse_refresh_token(self._refresh_secret, token)
        except InvalidToken:
            return {"active": False}
        state = await self._session_async(session_id)
        if state is None or state.generation != generation:
            return {"active": False}
        if not session.is_valid(state, now, self._policy):
            return {"active": False}
        ends, _ = session.expiry(state, self._policy)
        return {
            "active": True,
            "token_type": "refresh_token",
            "sub": state.user,
            "sid": state.session_id,
            "client_id": state.client_id,
            "scope": " ".join(state.scope),
            "iat": int(state.started_at.timestamp()),
            "exp": int(ends.timestamp()),
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
        }

    def _session_of(self, token: str) -> str | None:
        try:
            return parse_refresh_token(self._refresh_secret, token)[0]
        except InvalidToken:
            pass
        try:
            return self._verify(token, self.clock()).session_id
        except InvalidToken:
            return None

    def _parse_refresh(self, token: str) -> tuple[str, int]:
        try:
            return parse_refresh_token(self._refresh_secret, token)
        except InvalidToken:
            raise InvalidGrant("the refresh token is not valid") from None

    def _verify(self, token: str, now: datetime) -> AccessClaims:
        return verify_access_token(
            self.keyring(),
            token,
            issuer=self._settings.issuer,
            audience=self._settings.audience,
            now=now,
        )

    def _decide_dpop(
        self, state: SessionState, jkt: str | None, info: RequestInfo, now: datetime
    ) -> Decision | None:
        return session.decide_dpop(
            state,
            jkt,
            ip=info.ip,
            user_agent=info.user_agent,
            now=now,
            revoke=self._settings.dpop_mismatch_revokes,
        )

    def _decide(
        self,
        session_id: str,
        info: RequestInfo,
        decide: Callable[[SessionState, datetime], Decision],
    ) -> Decision | None:
        for _ in range(LOST_RACE_ATTEMPTS - 1):
            with suppress(ConcurrencyConflict):
                return self._decide_once(session_id, info, decide)
        return self._decide_once(session_id, info, decide)

    def _decide_once(
        self,
        session_id: str,
        info: RequestInfo,
        decide: Callable[[SessionState, datetime], Decision],
    ) -> Decision | None:
        with self._transaction() as conn:
            state = load_session(conn, session_id, for_update=True)
            if state is None:
                return None
            decision = decide(state, self._now(state))
            apply_decision(self._store, conn, state, decision, info)
        return decision

    async def _session_async(self, session_id: str) -> SessionState | None:
        with translated_errors():
            async with self._apool.connection() as conn:
                return await load_session_async(conn, session_id, for_update=False)

    def _now(self, state: SessionState) -> datetime:
        """The time of a decision, read once the session's row is locked: a request that waited
        for another one decides after it, and a stream's times never run backwards (not even
        when servers' clocks disagree)."""
        return max(self.clock(), session.last_event_at(state))

    async def _apply_async(
        self, tx: PipelinedTransaction, state: SessionState, decision: Decision, info: RequestInfo
    ) -> SessionState:
        """_apply in a pipelined transaction: the events and the row are only queued."""
        if not decision.events:
            return state
        meta = info.metadata(state.client_id)
        await tx.append(_stream(state.session_id), state.version, decision.events, meta)
        for event in decision.events:
            state = session.evolve(state, state.session_id, event)
        await save_session_async(tx.conn, state)
        return state

    def _grant(self, state: SessionState, token: str, now: datetime, jkt: str | None) -> TokenGrant:
        """The grant's tokens; the access token is bound to the session's key, or else to the
        key the request proved (RFC 9449 §5 allows a bound access token beside a bearer
        refresh token)."""
        bound = state.jkt or jkt
        ttl_end = now + self._policy.access_token_ttl
        expires_at = min(ttl_end, session.absolute_end_of(state, self._policy))
        access = issue_access_token(
            self.keyring(),
            issuer=self._settings.issuer,
            audience=self._settings.audience,
            subject=state.user,
            session_id=state.session_id,
            client_id=state.client_id,
            scope=state.scope,
            now=now,
            expires_at=expires_at,
            jkt=bound,
        )
        expires_in = max(int((expires_at - now) / timedelta(seconds=1)), 0)
        ends_in = (session.absolute_end_of(state, self._policy) - now) // timedelta(seconds=1)
        token_type = "Bearer" if bound is None else "DPoP"
        return TokenGrant(access, expires_in, token, state.scope, max(ends_in, 0), token_type)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with translated_errors(), self._pool.connection() as conn:
            yield conn


T = TypeVar("T")
LOST_RACE_ATTEMPTS = 3
"""Tries of a decision on a locked session that lost a race it could not see: transactions
waiting for one row lock may be handed their ids in another order than the lock's, and the
event-ordering rule (DESIGN.md) then refuses the append of the one whose id is older
(ConcurrencyConflict). Each try is a new transaction, with a new id, deciding afresh."""


async def _retried(attempt: Callable[[], Awaitable[T]]) -> T:
    for _ in range(LOST_RACE_ATTEMPTS - 1):
        with suppress(ConcurrencyConflict):
            return await attempt()
    return await attempt()


def apply_decision(
    store: EventStore, conn: Connection, state: SessionState, decision: Decision, info: RequestInfo
) -> SessionState:
    """Append the decision's events and save the folded row, in the caller's transaction (which
    holds the row's lock)."""
    meta = info.metadata(state.client_id)
    return apply_session_decision(store, conn, state, decision, meta)


def end_user_sessions(
    pool: ConnectionPool,
    user: str,
    reason: str,
    *,
    clock: Callable[[], datetime],
    policy: session.Policy,
    info: RequestInfo,
    beyond_scopes: Sequence[str] | None = None,
    batch_size: int = 500,
) -> int:
    """End every session of `user` that is valid now (with `beyond_scopes`, every one holding a
    scope outside it), each with its own SessionEnded, in transactions of up to `batch_size`
    sessions (their rows locked); the count ended."""

    def batch(conn: Connection, now: datetime) -> list[SessionState]:
        return valid_user_sessions(
            conn, user, now, policy, batch_size, for_update=True, beyond_scopes=beyond_scopes
        )

    return _end_sessions(pool, batch, reason, clock, policy, info, batch_size)


def end_client_sessions(
    pool: ConnectionPool,
    client_id: str,
    reason: str,
    *,
    clock: Callable[[], datetime],
    policy: session.Policy,
    info: RequestInfo,
    batch_size: int = 500,
) -> int:
    """End every session of the client that is valid now, as end_user_sessions does."""

    def batch(conn: Connection, now: datetime) -> list[SessionState]:
        return valid_client_sessions(conn, client_id, now, policy, batch_size)

    return _end_sessions(pool, batch, reason, clock, policy, info, batch_size)


def _end_sessions(
    pool: ConnectionPool,
    select: Callable[[Connection, datetime], list[SessionState]],
    reason: str,
    clock: Callable[[], datetime],
    policy: session.Policy,
    info: RequestInfo,
    batch_size: int,
) -> int:
    store = EventStore(pool)
    ended = 0
    while True:
        with translated_errors(), pool.connection() as conn, conn.transaction():
            batch = select(conn, clock())
            for state in batch:
                now = max(clock(), session.last_event_at(state))
                decision = session.decide_end(state, reason, now, policy)
                apply_decision(store, conn, state, decision, info)
                ended += decision.outcome is Outcome.OK
        if len(batch) < batch_size:
            return ended


@dataclass(frozen=True)
class Failure:
    """A failed login or client authentication: why, who asked, and when."""

    reason: str
    info: RequestInfo
    at: datetime


def record_failure(
    store: EventStore,
    conn: Connection,
    state: principal.PrincipalState,
    failure: Failure,
    policy: principal.LockoutPolicy,
    *,
    client: bool = False,
) -> None:
    """Append a failed login (or with `client`, a failed client authentication) and the lock it
    may bring, and save the principal's row, in the caller's transaction, which holds the row's
    lock (load_principal with for_update)."""
    info = failure.info
    events = principal.decide_failure(
        state,
        failure.reason,
        ip=info.ip,
        user_agent=info.user_agent,
        now=failure.at,
        policy=policy,
        client=client,
    )
    stream = client_stream(state.name) if client else principal_stream(state.name)
    store.append(stream, state.version, events, info.metadata(), conn=conn)
    for event in events:
        state = principal.evolve(state, event)
    save_principal(conn, state, table="client_lockouts" if client else "principals")


def _stream(session_id: str) -> Stream:
    return session_stream(session_id)


def _refusal(outcome: Outcome, state: SessionState) -> Outcome:
    """Why a refresh was refused; for a session that ended earlier, why it ended, so that the
    holder of the newest token learns of a theft or an expiry as well as the thief does."""
    if outcome is Outcome.ENDED and state.end_reason in _ENDINGS:
        return _ENDINGS[state.end_reason]
    return outcome


_ENDINGS = {
    o.value: o for o in (Outcome.IDLE_TIMEOUT, Outcome.ABSOLUTE_TIMEOUT, Outcome.REUSE_DETECTED)
}


def _granted_scope(
    held: tuple[str, ...], requested: str | None, holder: str = "this user"
) -> tuple[str, ...]:
    if requested is None or not requested.strip():
        return held
    asked = tuple(dict.fromkeys(requested.split()))
    beyond = [s for s in asked if s not in held]
    if beyond:
        raise InvalidScope(f"scope {' '.join(beyond)!r} is not granted to {holder}")
    return asked


def _dpop_refusal(jkt: str | None) -> InvalidDpopProof:
    """Why a bound session's refresh or revocation with the proof of key `jkt` was refused."""
    return InvalidDpopProof(_DPOP_REFUSALS["missing" if jkt is None else "another_key"])


def _check_binding(claims: AccessClaims, jkt: str | None) -> None:
    """RFC 9449 §7: a bound token only with its key's proof, an unbound one only as Bearer."""
    if claims.jkt != jkt:
        raise DpopBindingRefused(_BINDING_REFUSALS[(claims.jkt is None, jkt is None)])


def _introspection(claims: AccessClaims, token_type: str) -> dict[str, object]:
    confirmation = {} if claims.jkt is None else {"cnf": {"jkt": claims.jkt}}
    return {
        "active": True,
        # RFC 9449 §6.2: a bound token is introspected as a DPoP one, with its key.
        "token_type": token_type if claims.jkt is None else "DPoP",
        **confirmation,
        "sub": claims.subject,
        **({} if claims.session_id is None else {"sid": claims.session_id}),
        "client_id": claims.client_id,
        "scope": " ".join(claims.scope),
        "exp": int(claims.expires_at.timestamp()),
        "iat": int(claims.issued_at.timestamp()),
        "iss": claims.issuer,
        "aud": claims.audience,
    }
