"""Access-token signing keys, the security-event signing key and server secrets, kept in
PostgreSQL and sealed at rest."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from api.jwk import b64url, jwk_thumbprint
from ledger.clock import require_aware
from ledger.db import translated_errors

ALGORITHM = "EdDSA"
REFRESH_KEY_NAME = "refresh_token_key"
CLIENT_SECRET_KEY_NAME = "client_secret_key"  # noqa: S105 (a row name)
"""The server secret client secrets are hashed under (HMAC-SHA-256)."""
SEALING_VARIABLE = "LEDGER_KEY_ENCRYPTION_KEY"
DPOP_NONCE_KEY_NAME = "dpop_nonce_key"
LOGIN_FORM_KEY_NAME = "login_form_key"
"""The HMAC key of the hosted login page's CSRF tokens."""
"""The server secret DPoP nonces are an HMAC under (api.dpop.Nonces)."""
EVENT_KEY_NAME = "security_event_key"
"""The server_secrets row holding the key Security Event Tokens are signed with."""
EVENT_KEY_ALGORITHM = "RS256"
"""The CAEP interoperability profile's algorithm for every SET, with a key of 2048 bits or more."""
EVENT_KEY_BITS = 2048

KEY_CHANGE_MARGIN = timedelta(seconds=60)
"""How long past its last possible token a retired key stays in the JWKS: for the worker that
learns of a rotation late (api.changes) and for verifiers between two reads of the JWKS."""

_FORMAT = b"v1"
_SALT_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SECRET_BYTES = 32

# One lock for every write here: creating the first key, rotating, creating the refresh secret.
# An arbitrary constant; it only has to differ from other advisory locks on the same database.
_LOCK_ID = 0x5E55_1017_4B45_5953
_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_SELECT_KEYS = (
    "SELECT kid, algorithm, private_key, sealed, created_at, retired_at FROM signing_keys"
    " ORDER BY created_at, kid"
)
_HAS_CURRENT_KEY = "SELECT EXISTS (SELECT 1 FROM signing_keys WHERE retired_at IS NULL)"
_INSERT_KEY = (
    "INSERT INTO signing_keys (kid, algorithm, private_key, sealed, created_at)"
    " VALUES (%s, %s, %s, %s, %s)"
)
_RETIRE_KEYS = "UPDATE signing_keys SET retired_at = %s WHERE retired_at IS NULL"
_SELECT_SERVER_KEY = "SELECT value, sealed FROM server_secrets WHERE name = %s"
_INSERT_SERVER_KEY = (
    "INSERT INTO server_secrets (name, value, sealed, created_at) VALUES (%s, %s, %s, %s)"
)

Connection = psycopg.Connection[TupleRow]


class KeyStoreError(Exception):
    """Raised when signing keys or server secrets cannot be read, unsealed or used."""


class Sealer:
    # Never give this class a repr or str that shows the passphrase or a derived key.
    __slots__ = ("_derived", "_passphrase")

    def __init__(self, passphrase: str | None) -> None:
        if passphrase is not None and not passphrase:
            raise KeyStoreError(f"{SEALING_VARIABLE} is empty")
        self._passphrase = passphrase
        # Scrypt costs tens of milliseconds by design and every key is unsealed at each start.
        self._derived: dict[bytes, bytes] = {}

    def seal(self, data: bytes) -> tuple[bytes, bool]:
        if self._passphrase is None:
            return data, False
        salt = os.urandom(_SALT_BYTES)
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(self._key(self._passphrase, salt)).encrypt(nonce, data, _FORMAT)
        return _FORMAT + salt + nonce + ciphertext, True

    def unseal(self, stored: bytes, sealed: bool) -> bytes:
        if not sealed:
            return stored
        if self._passphrase is None:
            raise KeyStoreError(
                f"{SEALING_VARIABLE} is needed to read the sealed signing keys and secrets"
            )
        if not stored.startswith(_FORMAT) or len(stored) < _sealed_overhead():
            raise KeyStoreError("cannot unseal a stored key: unknown format")
        salt_end = len(_FORMAT) + _SALT_BYTES
        salt, nonce = stored[len(_FORMAT) : salt_end], stored[salt_end : salt_end + _NONCE_BYTES]
        aead = AESGCM(self._key(self._passphrase, salt))
        try:
            return aead.decrypt(nonce, stored[salt_end + _NONCE_BYTES :], _FORMAT)
        except InvalidTag:
            raise KeyStoreError(f"cannot unseal a stored key: wrong {SEALING_VARIABLE}?") from None

    def _key(self, passphrase: str, salt: bytes) -> bytes:
        key = self._derived.get(salt)
        if key is None:
            kdf = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1)
            key = self._derived[salt] = kdf.derive(passphrase.encode("utf-8"))
        return key


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: Ed25519PrivateKey = field(repr=False)
    created_at: datetime
    retired_at: datetime | None = None

    def public_jwk(self) -> dict[str, str]:
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        x = b64url(raw)
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": x,
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
        }


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[SigningKey, ...]

    @property
    def current(self) -> SigningKey:
        live = [key for key in self.keys if key.retired_at is None]
        if not live:
            raise KeyStoreError("there is no unretired signing key")
        return max(live, key=lambda key: (key.created_at, key.kid))

    def for_kid(self, kid: str) -> SigningKey | None:
        return next((key for key in self.keys if key.kid == kid), None)

    def jwks(self, now: datetime, retention: timedelta) -> dict[str, list[dict[str, str]]]:
        # `retention` covers the last token a retired key signed: access-token lifetime plus
        # KEY_CHANGE_MARGIN.
        published = [
            key.public_jwk()
            for key in self.keys
            if key.retired_at is None or key.retired_at + retention > now
        ]
        return {"keys": published}


def new_signing_key(now: datetime) -> SigningKey:
    require_aware(now, "now")
    return SigningKey(
        kid=secrets.token_urlsafe(12),
        algorithm=ALGORITHM,
        private_key=Ed25519PrivateKey.generate(),
        created_at=now,
    )


def load_keyring(pool: ConnectionPool, sealer: Sealer, now: datetime) -> KeyRing:
    require_aware(now, "now")
    with translated_errors(), pool.connection() as conn, conn.transaction():
        # Only the first start of a deployment writes; the others read without waiting.
        if not _has_current_key(conn):
            conn.execute(_LOCK, (_LOCK_ID,))
            # Read committed: this statement sees a key a concurrent starter committed while
            # we waited for the lock.
            if not _has_current_key(conn):
                _insert_key(conn, sealer, new_signing_key(now))
        rows = conn.execute(_SELECT_KEYS).fetchall()
    return KeyRing(tuple(_key_from_row(row, sealer) for row in rows))


def rotate_keys(pool: ConnectionPool, sealer: Sealer, now: datetime) -> SigningKey:
    key = new_signing_key(now)
    with translated_errors(), pool.connection() as conn, conn.transaction():
        # Without the lock, two rotations would each miss the other's new key and leave two
        # current keys.
        conn.execute(_LOCK, (_LOCK_ID,))
        conn.execute(_RETIRE_KEYS, (now,))
        _insert_key(conn, sealer, key)
    return key


def load_server_secret(
    pool: ConnectionPool, sealer: Sealer, now: datetime, name: str = REFRESH_KEY_NAME
) -> bytes:
    """The server secret `name` (32 random bytes), created on first need."""
    require_aware(now, "now")
    with translated_errors(), pool.connection() as conn, conn.transaction():
        row = conn.execute(_SELECT_SERVER_KEY, (name,)).fetchone()
        if row is None:
            conn.execute(_LOCK, (_LOCK_ID,))
            row = conn.execute(_SELECT_SERVER_KEY, (name,)).fetchone()
        if row is None:
            row = _insert_secret(conn, sealer, name, now)
    secret = sealer.unseal(bytes(row[0]), bool(row[1]))
    if len(secret) != _SECRET_BYTES:
        raise KeyStoreError(f"server secret {name!r} has the wrong length")
    return secret


@dataclass(frozen=True)
class EventSigningKey:
    """The RSA key Security Event Tokens are signed with; its kid is its RFC 7638 thumbprint."""

    private_key: rsa.RSAPrivateKey = field(repr=False)

    def public_jwk(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        members = {"e": _b64_uint(numbers.e), "kty": "RSA", "n": _b64_uint(numbers.n)}
        return {**members, "kid": jwk_thumbprint(members), "alg": EVENT_KEY_ALGORITHM, "use": "sig"}

    @property
    def kid(self) -> str:
        return self.public_jwk()["kid"]


def load_event_signing_key(pool: ConnectionPool, sealer: Sealer, now: datetime) -> EventSigningKey:
    """The security-event signing key, created (RSA, EVENT_KEY_BITS) on first need."""
    require_aware(now, "now")
    with translated_errors(), pool.connection() as conn, conn.transaction():
        row = conn.execute(_SELECT_SERVER_KEY, (EVENT_KEY_NAME,)).fetchone()
        if row is None:
            conn.execute(_LOCK, (_LOCK_ID,))
            row = conn.execute(_SELECT_SERVER_KEY, (EVENT_KEY_NAME,)).fetchone()
        if row is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=EVENT_KEY_BITS)
            stored, sealed = sealer.seal(_pkcs8(key))
            conn.execute(_INSERT_SERVER_KEY, (EVENT_KEY_NAME, stored, sealed, now))
            row = (stored, sealed)
    der = sealer.unseal(bytes(row[0]), bool(row[1]))
    try:
        loaded = serialization.load_der_private_key(der, password=None)
    except ValueError:
        raise KeyStoreError("the security-event key is not a readable PKCS#8 key") from None
    if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size < EVENT_KEY_BITS:
        raise KeyStoreError(f"the security-event key is not an RSA key of {EVENT_KEY_BITS} bits")
    return EventSigningKey(loaded)


def _b64_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _pkcs8(key: Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _has_current_key(conn: Connection) -> bool:
    row = conn.execute(_HAS_CURRENT_KEY).fetchone()
    return bool(row and row[0])


def _insert_key(conn: Connection, sealer: Sealer, key: SigningKey) -> None:
    stored, sealed = sealer.seal(_pkcs8(key.private_key))
    conn.execute(_INSERT_KEY, (key.kid, key.algorithm, stored, sealed, key.created_at))


def _insert_secret(
    conn: Connection, sealer: Sealer, name: str, now: datetime
) -> tuple[bytes, bool]:
    stored, sealed = sealer.seal(secrets.token_bytes(_SECRET_BYTES))
    conn.execute(_INSERT_SERVER_KEY, (name, stored, sealed, now))
    return stored, sealed


def _key_from_row(row: TupleRow, sealer: Sealer) -> SigningKey:
    kid, algorithm, stored, sealed, created_at, retired_at = row
    if algorithm != ALGORITHM:
        raise KeyStoreError(f"signing key {kid!r} uses unsupported algorithm {algorithm!r}")
    private_key = _load_private_key(kid, sealer.unseal(bytes(stored), bool(sealed)))
    return SigningKey(kid, algorithm, private_key, created_at, retired_at)


def _load_private_key(kid: str, der: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_der_private_key(der, password=None)
    except ValueError:
        raise KeyStoreError(f"signing key {kid!r} is not a readable PKCS#8 key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(f"signing key {kid!r} is not an Ed25519 key")
    return key


def _sealed_overhead() -> int:
    return len(_FORMAT) + _SALT_BYTES + _NONCE_BYTES + _TAG_BYTES
