"""Signing keys and the refresh-token key in a real PostgreSQL: creation, rotation, sealing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from psycopg_pool import ConnectionPool

from api.keys import (
    EVENT_KEY_NAME,
    KeyRing,
    KeyStoreError,
    Sealer,
    SigningKey,
    load_event_signing_key,
    load_keyring,
    load_server_secret,
    new_signing_key,
    rotate_keys,
)
from api.tokens import issue_access_token, verify_access_token

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
PASSPHRASE = "correct horse battery staple"
PLAIN = Sealer(None)
ISSUER = "https://ledger.example"
AUDIENCE = "https://api.example"

T = TypeVar("T")


def _all_at_once(count: int, call: Callable[[], T]) -> list[T]:
    # The barrier lines the threads up so their transactions overlap as closely as they can.
    barrier = threading.Barrier(count)

    def run() -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(count) as executor:
        futures = [executor.submit(run) for _ in range(count)]
        return [future.result(timeout=60) for future in futures]


def _race(pool: ConnectionPool, count: int, call: Callable[[], T]) -> list[T]:
    # The pool opens connections lazily, one at a time, which would serialise the racers; hold
    # `count` connections at once first so each racer finds one ready.
    def hold() -> None:
        with pool.connection():
            barrier.wait(timeout=30)

    barrier = threading.Barrier(count)
    _all_at_once(count, hold)
    return _all_at_once(count, call)


def _stored_keys(pool: ConnectionPool) -> list[tuple[str, bytes, bool, datetime | None]]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT kid, private_key, sealed, retired_at FROM signing_keys ORDER BY created_at"
        ).fetchall()
    return [(kid, bytes(stored), sealed, retired_at) for kid, stored, sealed, retired_at in rows]


def _der(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _raw(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _issue(ring: KeyRing) -> str:
    return issue_access_token(
        ring,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        session_id="s1",
        client_id="web",
        scope=("read",),
        now=NOW,
        expires_at=NOW + timedelta(minutes=15),
    )


def _verifies(ring: KeyRing, token: str) -> bool:
    claims = verify_access_token(ring, token, issuer=ISSUER, audience=AUDIENCE, now=NOW)
    return claims.subject == "alice"


def test_first_load_creates_exactly_one_key(pool: ConnectionPool) -> None:
    ring = load_keyring(pool, PLAIN, NOW)
    assert len(ring.keys) == 1
    assert ring.current.algorithm == "EdDSA"
    assert ring.current.created_at == NOW
    assert ring.current.retired_at is None
    assert [row[0] for row in _stored_keys(pool)] == [ring.current.kid]


def test_a_second_load_returns_the_same_key(pool: ConnectionPool) -> None:
    first = load_keyring(pool, PLAIN, NOW)
    second = load_keyring(pool, PLAIN, NOW + timedelta(hours=1))
    assert [key.kid for key in second.keys] == [first.current.kid]
    assert _raw(second.current) == _raw(first.current)


def test_concurrent_first_loads_create_one_key(pool: ConnectionPool) -> None:
    rings = _race(pool, 8, lambda: load_keyring(pool, PLAIN, NOW))
    stored = _stored_keys(pool)
    assert len(stored) == 1
    assert {ring.current.kid for ring in rings} == {stored[0][0]}


def test_rotation_retires_the_old_key_and_the_new_one_becomes_current(
    pool: ConnectionPool,
) -> None:
    old = load_keyring(pool, PLAIN, NOW).current
    rotated_at = NOW + timedelta(days=30)
    new = rotate_keys(pool, PLAIN, rotated_at)
    ring = load_keyring(pool, PLAIN, rotated_at)
    assert ring.current.kid == new.kid
    assert _raw(ring.current) == _raw(new)
    assert new.created_at == rotated_at
    assert new.kid != old.kid
    retired = ring.for_kid(old.kid)
    assert retired is not None
    assert retired.retired_at == rotated_at


def test_concurrent_rotations_leave_one_current_key(pool: ConnectionPool) -> None:
    load_keyring(pool, PLAIN, NOW)
    new_keys = _race(pool, 6, lambda: rotate_keys(pool, PLAIN, NOW + timedelta(days=1)))
    live = [row[0] for row in _stored_keys(pool) if row[3] is None]
    assert len(live) == 1
    assert live[0] in {key.kid for key in new_keys}
    assert len(_stored_keys(pool)) == 7


def test_a_token_signed_before_rotation_still_verifies(pool: ConnectionPool) -> None:
    token = _issue(load_keyring(pool, PLAIN, NOW))
    rotate_keys(pool, PLAIN, NOW)
    assert _verifies(load_keyring(pool, PLAIN, NOW), token)


def test_jwks_keeps_a_retired_key_until_its_retention_ends(pool: ConnectionPool) -> None:
    old = load_keyring(pool, PLAIN, NOW).current
    retired_at = NOW + timedelta(days=30)
    new = rotate_keys(pool, PLAIN, retired_at)
    ring = load_keyring(pool, PLAIN, retired_at)
    retention = timedelta(minutes=20)

    def published(now: datetime) -> list[str]:
        return [jwk["kid"] for jwk in ring.jwks(now, retention)["keys"]]

    assert sorted(published(retired_at)) == sorted([old.kid, new.kid])
    last_moment = retired_at + retention - timedelta(microseconds=1)
    assert sorted(published(last_moment)) == sorted([old.kid, new.kid])
    assert published(retired_at + retention) == [new.kid]
    assert published(retired_at + timedelta(days=1)) == [new.kid]


def test_public_jwk_is_an_rfc_8037_key_that_verifies_our_tokens() -> None:
    key = new_signing_key(NOW)
    jwk = key.public_jwk()
    assert {name: jwk[name] for name in ("kty", "crv", "kid", "alg", "use")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "kid": key.kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    token = _issue(KeyRing((key,)))
    public_key = jwt.PyJWK.from_dict(dict(jwk)).key
    options: jwt.types.Options = {"verify_exp": False}
    claims = jwt.decode(token, public_key, algorithms=["EdDSA"], audience=AUDIENCE, options=options)
    assert claims["sub"] == "alice"


def test_jwks_never_publishes_private_material() -> None:
    key = new_signing_key(NOW)
    ring = KeyRing((key,))
    published = ring.jwks(NOW, timedelta(minutes=20))["keys"]
    assert "d" not in published[0]
    assert repr(key).count("private") == 0


def test_current_is_the_newest_unretired_key() -> None:
    older = new_signing_key(NOW)
    newer = new_signing_key(NOW + timedelta(seconds=1))
    retired_newest = replace(new_signing_key(NOW + timedelta(seconds=2)), retired_at=NOW)
    assert KeyRing((newer, retired_newest, older)).current == newer


def test_a_ring_without_an_unretired_key_has_no_current_key() -> None:
    retired = replace(new_signing_key(NOW), retired_at=NOW)
    with pytest.raises(KeyStoreError, match="no unretired signing key"):
        _ = KeyRing((retired,)).current


def test_for_kid_finds_a_key_or_none() -> None:
    key = new_signing_key(NOW)
    assert KeyRing((key,)).for_kid(key.kid) == key
    assert KeyRing((key,)).for_kid("unknown") is None


def test_kids_are_random_and_url_safe() -> None:
    kids = {new_signing_key(NOW).kid for _ in range(20)}
    assert len(kids) == 20
    assert all(len(kid) == 16 and kid.replace("-", "").replace("_", "").isalnum() for kid in kids)


def test_a_load_after_every_key_was_retired_creates_a_current_key(pool: ConnectionPool) -> None:
    old = load_keyring(pool, PLAIN, NOW).current
    with pool.connection() as conn:
        conn.execute("UPDATE signing_keys SET retired_at = %s", (NOW,))
    ring = load_keyring(pool, PLAIN, NOW + timedelta(hours=1))
    assert ring.current.kid != old.kid
    assert ring.for_kid(old.kid) is not None


# Sealing.


def test_a_sealed_key_is_not_stored_in_the_clear(pool: ConnectionPool) -> None:
    key = load_keyring(pool, Sealer(PASSPHRASE), NOW).current
    [(_, stored, sealed, _)] = _stored_keys(pool)
    assert sealed is True
    assert _der(key) not in stored
    assert _raw(key) not in stored
    assert stored.startswith(b"v1")


def test_an_unsealed_key_is_stored_as_pkcs8_der(pool: ConnectionPool) -> None:
    key = load_keyring(pool, PLAIN, NOW).current
    [(_, stored, sealed, _)] = _stored_keys(pool)
    assert sealed is False
    assert stored == _der(key)


def test_reloading_with_the_same_passphrase_verifies_an_earlier_token(
    pool: ConnectionPool,
) -> None:
    token = _issue(load_keyring(pool, Sealer(PASSPHRASE), NOW))
    # A fresh Sealer has no cached derived keys: this is what a restart sees.
    assert _verifies(load_keyring(pool, Sealer(PASSPHRASE), NOW), token)


def test_a_sealed_key_without_a_passphrase_names_the_variable(pool: ConnectionPool) -> None:
    load_keyring(pool, Sealer(PASSPHRASE), NOW)
    with pytest.raises(KeyStoreError, match="LEDGER_KEY_ENCRYPTION_KEY is needed") as caught:
        load_keyring(pool, PLAIN, NOW)
    assert PASSPHRASE not in str(caught.value)


def test_a_wrong_passphrase_is_reported(pool: ConnectionPool) -> None:
    load_keyring(pool, Sealer(PASSPHRASE), NOW)
    with pytest.raises(KeyStoreError, match="wrong LEDGER_KEY_ENCRYPTION_KEY") as caught:
        load_keyring(pool, Sealer("a guess"), NOW)
    assert "a guess" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_sealer_round_trips_with_a_fresh_salt_and_nonce_each_time() -> None:
    sealer = Sealer(PASSPHRASE)
    first, first_sealed = sealer.seal(b"key material")
    second, _ = sealer.seal(b"key material")
    assert first_sealed
    assert first != second
    assert first[2:18] != second[2:18]
    assert sealer.unseal(first, True) == b"key material"
    assert Sealer(PASSPHRASE).unseal(second, True) == b"key material"


def test_sealer_without_a_passphrase_stores_data_as_it_is() -> None:
    assert PLAIN.seal(b"data") == (b"data", False)
    assert PLAIN.unseal(b"data", False) == b"data"


@pytest.mark.parametrize(
    "damage",
    [
        lambda stored: stored[:-1] + bytes([stored[-1] ^ 1]),
        lambda stored: stored[:20] + bytes([stored[20] ^ 1]) + stored[21:],
        lambda stored: b"v2" + stored[2:],
        lambda stored: stored[:30],
        lambda stored: b"",
    ],
)
def test_sealer_rejects_damaged_data(damage: Callable[[bytes], bytes]) -> None:
    stored, _ = Sealer(PASSPHRASE).seal(b"key material")
    with pytest.raises(KeyStoreError, match="cannot unseal"):
        Sealer(PASSPHRASE).unseal(damage(stored), True)


def test_an_empty_passphrase_is_refused() -> None:
    with pytest.raises(KeyStoreError, match="LEDGER_KEY_ENCRYPTION_KEY is empty"):
        Sealer("")


def test_a_key_in_the_clear_stays_readable_once_a_passphrase_is_set(pool: ConnectionPool) -> None:
    token = _issue(load_keyring(pool, PLAIN, NOW))
    assert _verifies(load_keyring(pool, Sealer(PASSPHRASE), NOW), token)


def test_a_naive_now_is_refused(pool: ConnectionPool) -> None:
    with pytest.raises(ValueError, match="aware"):
        load_keyring(pool, PLAIN, NOW.replace(tzinfo=None))


# The refresh-token key.


def test_the_refresh_secret_is_32_bytes_and_stable(pool: ConnectionPool) -> None:
    secret = load_server_secret(pool, PLAIN, NOW)
    assert len(secret) == 32
    assert load_server_secret(pool, PLAIN, NOW + timedelta(days=1)) == secret


def test_concurrent_first_loads_agree_on_one_refresh_secret(pool: ConnectionPool) -> None:
    secrets = _race(pool, 8, lambda: load_server_secret(pool, PLAIN, NOW))
    assert len(set(secrets)) == 1
    with pool.connection() as conn:
        row = conn.execute("SELECT count(*) FROM server_secrets").fetchone()
    assert row == (1,)


def test_the_refresh_secret_is_sealed_with_a_passphrase(pool: ConnectionPool) -> None:
    secret = load_server_secret(pool, Sealer(PASSPHRASE), NOW)
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT value, sealed, created_at FROM server_secrets WHERE name = 'refresh_token_key'"
        ).fetchone()
    assert row is not None
    value, sealed, created_at = row
    assert sealed is True
    assert secret not in bytes(value)
    assert created_at == NOW
    assert load_server_secret(pool, Sealer(PASSPHRASE), NOW) == secret
    with pytest.raises(KeyStoreError, match="LEDGER_KEY_ENCRYPTION_KEY"):
        load_server_secret(pool, PLAIN, NOW)


# The Security Event Token key.


def test_the_event_key_is_rsa_2048_stable_and_concurrently_created_once(
    pool: ConnectionPool,
) -> None:
    keys = _race(pool, 4, lambda: load_event_signing_key(pool, PLAIN, NOW))
    assert len({k.kid for k in keys}) == 1
    assert keys[0].private_key.key_size >= 2048
    assert load_event_signing_key(pool, PLAIN, NOW + timedelta(days=1)).kid == keys[0].kid
    jwk = keys[0].public_jwk()
    assert (jwk["kty"], jwk["alg"], jwk["use"]) == ("RSA", "RS256", "sig")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    token = jwt.encode({"iss": "x"}, keys[0].private_key, algorithm="RS256")
    assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"]) == {"iss": "x"}


def test_the_event_key_is_sealed_with_a_passphrase(pool: ConnectionPool) -> None:
    key = load_event_signing_key(pool, Sealer(PASSPHRASE), NOW)
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT value, sealed FROM server_secrets WHERE name = %s", (EVENT_KEY_NAME,)
        ).fetchone()
    assert row is not None
    assert row[1] is True
    der = key.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert der not in bytes(row[0])
    assert load_event_signing_key(pool, Sealer(PASSPHRASE), NOW).kid == key.kid
