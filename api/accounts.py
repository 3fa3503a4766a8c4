"""Users and clients: argon2id-hashed passwords, keyed hashes of client secrets, registered grants
and scopes.

A client secret is high-entropy (server-generated, or at least MIN_SECRET_BITS when supplied), so
its verifier can be fast: HMAC-SHA-256 under the server secret `client_secret_key`, compared in
constant time. A slow hash would only hand whoever sends wrong secrets a way to exhaust the
server's memory and cores. Secrets stored before this as argon2id hashes are verified that way
once more, and replaced by their keyed hash on that first successful use.

A user name is one account whatever its case or Unicode form: logins, and the commands that name
a user, look it up by its normalised form (normal_name: NFKC, case-folded). No two users may share
a look-alike key either (name_key: the normal form with the confusables UTS #39 lists among the
characters a name may hold folded together), so neither `LOCKME` nor `I0ckme` can sit beside
`lockme`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import re
import secrets
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from api.tokens import is_scope_token
from ledger.db import translated_errors

AUTHORIZATION_CODE = "authorization_code"
CLIENT_CREDENTIALS = "client_credentials"
SUPPORTED_GRANTS = (AUTHORIZATION_CODE, "refresh_token", "password", CLIENT_CREDENTIALS)
"""Grant types this server issues tokens for (RFC 6749 names)."""
DEFAULT_GRANTS = (AUTHORIZATION_CODE, "refresh_token")
"""What `clients add` grants when no --grant is given: not the password grant, which RFC 9700
§2.4 says must not be used (the app sees the password)."""

PRODUCTION_HASHER = PasswordHasher()
"""argon2id with argon2-cffi's defaults (RFC 9106's second recommended option)."""

MIN_SECRET_BITS = 128
"""The least strength `clients add --secret-stdin` accepts (see secret_bits)."""

SECRET_HASH_PREFIX = "hmac-sha256$"  # noqa: S105 (a format tag, not a secret)
_LEGACY_PREFIX = "$argon2"
_STAND_IN_SECRET_HASH = SECRET_HASH_PREFIX + "0" * 64
_CHARACTER_CLASSES = (
    string.ascii_lowercase,
    string.ascii_uppercase,
    string.digits,
    string.punctuation + " ",
)
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
_MAX_SCOPE_CHARS = 64
_MAX_REDIRECT_URI_CHARS = 2000


class AccountError(ValueError):
    """A user or client cannot be created as asked (bad name, scope, grant, or it exists)."""


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    scopes: tuple[str, ...]
    disabled: bool = False
    """`users disable`: the account stays, but no login succeeds."""


INTROSPECT_SCOPE = "tokens:introspect"
"""The client scope that lets a confidential client call POST /oauth/introspect."""
SESSIONS_READ_SCOPE = "sessions:read"
"""The scope that lets a resource server follow GET /feeds/session-ends (a client scope, which
its client_credentials tokens carry)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    secret_hash: str | None
    grants: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    """What the client itself may do (INTROSPECT_SCOPE), apart from its users' scopes."""
    dpop_bound: bool = False
    """Every token request needs a DPoP proof (RFC 9449 §5.2, dpop_bound_access_tokens)."""
    redirect_uris: tuple[str, ...] = ()
    """Where the authorization endpoint may send the user back (compared as exact strings)."""

    @property
    def is_confidential(self) -> bool:
        return self.secret_hash is not None

    @property
    def has_legacy_secret(self) -> bool:
        """The secret is stored as an argon2id hash, from before keyed hashes."""
        return self.secret_hash is not None and self.secret_hash.startswith(_LEGACY_PREFIX)


class Accounts:
    """Reads and verifies users and clients; the CLI creates them."""

    def __init__(
        self,
        pool: ConnectionPool,
        hasher: PasswordHasher = PRODUCTION_HASHER,
        *,
        secret_key: bytes | None = None,
    ) -> None:
        """`secret_key` (the server secret CLIENT_SECRET_KEY_NAME) is needed to create and
        verify client secrets, and only for that."""
        self.pool = pool
        self._hasher = hasher
        self._secret_key = secret_key

    def add_user(self, name: str, password: str, scopes: tuple[str, ...] = ()) -> User:
        """Create the user; AccountError when the name is taken, even in another case or by a
        look-alike (name_key)."""
        _check_name(name, "user name")
        user = User(name, self.password_hash(password), self.checked_scopes(scopes))
        with translated_errors(), self.pool.connection() as conn:
            inserted = conn.execute(
                "INSERT INTO users (name, password_hash, scopes) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (user.name, user.password_hash, list(user.scopes)),
            ).rowcount
            if inserted == 0:
                row = conn.execute(
                    "SELECT name FROM users WHERE name_key = %s", (name_key(name),)
                ).fetchone()
                taken = name if row is None else row[0]
                if taken == name:
                    raise AccountError(f"user {name!r} already exists")
                raise AccountError(
                    f"user name {name!r} is too like the existing user {taken!r} (names are"
                    " case-insensitive, and I, i, 1 and l, 0 and o, m and rn count as the same)"
                )
        return user

    def password_hash(self, password: str) -> str:
        """The stored form of a password (argon2id); AccountError for an empty one."""
        if not password:
            raise AccountError("the password is empty")
        return self._hasher.hash(password)

    @staticmethod
    def checked_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
        """The scopes, each once; AccountError naming one that is no RFC 6749 scope token."""
        for scope in scopes:
            if len(scope) > _MAX_SCOPE_CHARS or not is_scope_token(scope):
                raise AccountError(f"{scope!r} is not a valid scope (RFC 6749 §3.3)")
        return tuple(dict.fromkeys(scopes))

    def add_client(
        self,
        client_id: str,
        secret: str | None,
        grants: tuple[str, ...],
        scopes: tuple[str, ...] = (),
        *,
        dpop_bound: bool = False,
        redirect_uris: tuple[str, ...] = (),
    ) -> Client:
        _check_name(client_id, "client id")
        for uri in redirect_uris:
            _check_redirect_uri(uri)
        if AUTHORIZATION_CODE in grants and not redirect_uris:
            raise AccountError(f"the {AUTHORIZATION_CODE} grant needs at least one --redirect-uri")
        unknown = [g for g in grants if g not in SUPPORTED_GRANTS]
        if unknown or not grants:
            raise AccountError(
                f"grants must be some of {', '.join(SUPPORTED_GRANTS)}; got {', '.join(grants)}"
            )
        if CLIENT_CREDENTIALS in grants and secret is None:
            raise AccountError(f"only a confidential client may use the {CLIENT_CREDENTIALS} grant")
        if secret is not None and (bits := secret_bits(secret)) < MIN_SECRET_BITS:
            raise AccountError(
                f"the client secret has about {bits:.0f} bits; at least {MIN_SECRET_BITS} are"
                " needed (a confidential client without a supplied secret gets a generated one)"
            )
        if INTROSPECT_SCOPE in scopes and secret is None:
            raise AccountError(f"only a confidential client may hold {INTROSPECT_SCOPE}")
        secret_hash = None if secret is None else self.secret_hash(secret)
        granted = self.checked_scopes(scopes)
        grants = tuple(dict.fromkeys(grants))
        uris = tuple(dict.fromkeys(redirect_uris))
        client = Client(client_id, secret_hash, grants, granted, dpop_bound, uris)
        self._insert(
            "INSERT INTO clients (client_id, secret_hash, grants, scopes, dpop_bound,"
            " redirect_uris) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (client_id, secret_hash, list(grants), list(granted), dpop_bound, list(uris)),
            f"client {client_id!r} already exists",
        )
        return client

    def user(self, name: str) -> User | None:
        """The user `name` names in any case or Unicode form (normal_name), or None."""
        with translated_errors(), self.pool.connection() as conn:
            row = conn.execute(_USER, (name_key(name), normal_name(name))).fetchone()
        return None if row is None else User(row[0], row[1], tuple(row[2]), row[3])

    def client(self, client_id: str) -> Client | None:
        with translated_errors(), self.pool.connection() as conn:
            row = conn.execute(_CLIENT, (client_id,), prepare=True).fetchone()
        return None if row is None else _client(row)

    @functools.cached_property
    def _dummy_hash(self) -> str:
        # Verifying against this when the user does not exist costs the same as a real check;
        # made on first need, so that commands which never verify do not pay for a hash.
        return self._hasher.hash(secrets.token_urlsafe(16))

    def check_password(self, user: User | None, password: str) -> bool:
        """True when the password is the user's; as slow for an unknown user as for a known one."""
        return self._verify(user.password_hash if user else self._dummy_hash, password) and (
            user is not None
        )

    def secret_hash(self, secret: str) -> str:
        """The stored form of a client secret: its HMAC-SHA-256 under the server's key."""
        if self._secret_key is None:
            raise ValueError("client secrets need the server's client_secret_key")
        digest = hmac.new(self._secret_key, secret.encode(), hashlib.sha256).hexdigest()
        return SECRET_HASH_PREFIX + digest

    def check_secret(self, client: Client | None, secret: str) -> bool:
        """True when `secret` is the confidential client's. The same work for an unknown or a
        public client, so that the time to answer tells nothing. Not for legacy hashes."""
        stored = client.secret_hash if client is not None else None
        presented = self.secret_hash(secret)
        matches = hmac.compare_digest(presented, stored or _STAND_IN_SECRET_HASH)
        return matches and stored is not None

    def check_legacy_secret(self, client: Client, secret: str) -> bool:
        """check_secret for a secret stored as an argon2id hash; on success the stored hash is
        replaced by the keyed one (by a statement that changes nothing if another request or
        the CLI replaced it first)."""
        stored = client.secret_hash
        if stored is None or not self._verify(stored, secret):
            return False
        with translated_errors(), self.pool.connection() as conn:
            conn.execute(
                "UPDATE clients SET secret_hash = %s WHERE client_id = %s AND secret_hash = %s",
                (self.secret_hash(secret), client.client_id, stored),
            )
        return True

    def _verify(self, hash_: str, secret: str) -> bool:
        try:
            return self._hasher.verify(hash_, secret)
        except (VerificationError, InvalidHashError):
            return False

    def user_listing(self) -> list[tuple[str, tuple[str, ...], bool, datetime | None]]:
        """Every user's name, scopes, whether disabled, and recorded lock end (past ones
        included), by name."""
        with translated_errors(), self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT u.name, u.scopes, u.disabled, p.locked_until FROM users u"
                " LEFT JOIN principals p ON p.name = u.name ORDER BY u.name"
            ).fetchall()
        return [(row[0], tuple(row[1]), row[2], row[3]) for row in rows]

    def clients(self) -> list[Client]:
        """Every registered client, by id."""
        with translated_errors(), self.pool.connection() as conn:
            rows = conn.execute(_CLIENTS).fetchall()
        return [_client(row) for row in rows]

    def widen_client(
        self, client_id: str, grants: tuple[str, ...], redirect_uris: tuple[str, ...]
    ) -> None:
        """Let an existing public or confidential client use `grants` and `redirect_uris` too
        (what it had stays); `serve --demo` brings its client up to date so."""
        for uri in redirect_uris:
            _check_redirect_uri(uri)
        if unknown := [g for g in grants if g not in SUPPORTED_GRANTS]:
            raise AccountError(f"grants must be some of {', '.join(SUPPORTED_GRANTS)}: {unknown}")
        with translated_errors(), self.pool.connection() as conn:
            conn.execute(
                "UPDATE clients SET grants = ARRAY(SELECT DISTINCT unnest(grants || %s::text[])),"
                " redirect_uris = ARRAY(SELECT DISTINCT unnest(redirect_uris || %s::text[]))"
                " WHERE client_id = %s",
                (list(grants), list(redirect_uris), client_id),
            )

    def _insert(self, query: str, params: tuple[object, ...], exists: str) -> None:
        with translated_errors(), self.pool.connection() as conn:
            if conn.execute(query, params).rowcount == 0:
                raise AccountError(exists)


# The unique index on name_key finds the one candidate; the second test keeps only the very name.
_USER = (
    "SELECT name, password_hash, scopes, disabled FROM users"
    ' WHERE name_key = %s AND lower(name COLLATE "C") = %s'
)
_CLIENTS = (
    "SELECT client_id, secret_hash, grants, scopes, dpop_bound, redirect_uris FROM clients"
    " ORDER BY client_id"
)
_CLIENT = (
    "SELECT client_id, secret_hash, grants, scopes, dpop_bound, redirect_uris FROM clients"
    " WHERE client_id = %s"
)


class ClientDirectory:
    """Registered clients for the request path, on the event loop, served from memory while
    `live()` says that changes are being followed (api.changes): a change to `clients` then
    reaches `forget()` within milliseconds. Otherwise every lookup reads the database. Unknown
    ids are read every time: caching them would let anyone grow the cache."""

    def __init__(
        self, apool: AsyncConnectionPool[Any], live: Callable[[], bool] = lambda: False
    ) -> None:
        self._apool = apool
        self._live = live
        self._cache: dict[str, Client] = {}
        self._generation = 0

    def forget(self) -> None:
        """Drop every client held; a lookup already reading the database keeps its answer
        to itself."""
        self._cache.clear()
        self._generation += 1

    async def client(self, client_id: str) -> Client | None:
        live = self._live()
        if live and (cached := self._cache.get(client_id)) is not None:
            return cached
        generation = self._generation
        with translated_errors():
            async with self._apool.connection() as conn:
                cursor = await conn.execute(_CLIENT, (client_id,), prepare=True)
                row = await cursor.fetchone()
        client = None if row is None else _client(row)
        # A change announced while this read was in flight may postdate what it read.
        if live and client is not None and generation == self._generation:
            self._cache[client_id] = client
        return client


def _client(row: tuple[Any, ...]) -> Client:
    return Client(row[0], row[1], tuple(row[2]), tuple(row[3]), row[4], tuple(row[5]))


def secret_bits(secret: str) -> float:
    """An upper estimate of a secret's strength in bits: its length times log2 of the alphabet
    its character classes span (lower case, upper case, digits, other ASCII; anything else counts
    as 128 more), and 0 when one character makes up more than a quarter of it. A generated
    secret (32 random bytes, base64url) scores over 250."""
    if not secret or max(secret.count(c) for c in set(secret)) * 4 > len(secret):
        return 0.0
    alphabet = sum(len(chars) for chars in _CHARACTER_CLASSES if any(c in chars for c in secret))
    if any(not c.isascii() for c in secret):
        alphabet += 128
    return len(secret) * math.log2(alphabet)


def normal_name(name: str) -> str:
    """The form a user name is known by: NFKC, case-folded, NFKC again (Unicode's
    NFKC_Casefold, closely), so `ADA` and `ada` in full-width letters both name `ada`."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def name_key(name: str) -> str:
    """The look-alike key two user names may not share: normal_name with the characters that
    Unicode's confusables.txt (UTS #39) maps together among those a name may hold folded to
    one: I, i and 1 to l; 0 to o; m to rn. Case is folded first, so `I0ckme` and `LOCKME` both
    meet `lockme`. schema.sql computes the same key for the users.name_key column."""
    return normal_name(name).translate(_LOOK_ALIKES)


# The prototypes of confusables.txt whose source and target are both characters of _NAME
# (`1` and `I` → `l`, `0` → `O`, `m` → `rn`), after case folding; `i` joins `l` because a
# case-insensitive name may be written `I`.
_LOOK_ALIKES = str.maketrans({"i": "l", "1": "l", "0": "o", "m": "rn"})


def is_account_name(name: str) -> bool:
    """Whether `name` could be a user name or client id (see _check_name)."""
    return _NAME.fullmatch(name) is not None


def _check_redirect_uri(uri: str) -> None:
    """RFC 6749 §3.1.2 and RFC 9700 §2.1: absolute, no fragment; https, or http on a loopback
    address (RFC 8252 §7.3) for native apps and development."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        raise AccountError(f"redirect URI {uri!r} is not a URI") from None
    if not parts.scheme or not host or len(uri) > _MAX_REDIRECT_URI_CHARS:
        raise AccountError(f"redirect URI {uri!r} must be an absolute URI with a host")
    if "#" in uri:
        raise AccountError(f"redirect URI {uri!r} must not have a fragment (RFC 6749 §3.1.2)")
    loopback = host in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise AccountError(f"redirect URI {uri!r} must use https (http only on loopback)")
    if any(c.isspace() or ord(c) < 0x21 for c in uri):
        raise AccountError(f"redirect URI {uri!r} must not hold spaces or control characters")


def _check_name(name: str, what: str) -> None:
    if not is_account_name(name):
        raise AccountError(f"{what} {name!r} must be 1 to 128 letters, digits or . _ @ + -")
