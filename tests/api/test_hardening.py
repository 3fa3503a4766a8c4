"""Findings of an adversarial review of the running service, one test (or a few) per finding,
named after what was tried. Each ran against a real server over HTTP on loopback.

1. Client-secret guessing: unlimited tries, each an argon2 hash that a flood turned into a way
   to exhaust the server.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
import requests
from argon2 import PasswordHasher
from psycopg_pool import ConnectionPool

from api.accounts import MIN_SECRET_BITS, AccountError, Accounts, secret_bits
from api.ratelimit import RateLimit
from projections.principal import LockoutPolicy
from tests.api.conftest import CHEAP_HASHER, SECRET, LiveServer, client_secret_key

FIVE_A_MINUTE = RateLimit(limit=5, window=timedelta(minutes=1))
THREE_WRONG = LockoutPolicy(max_failures=3, window=timedelta(minutes=15))
LiveFactory = Callable[..., LiveServer]


def _introspect(live: LiveServer, secret: str, client_id: str = "backend") -> requests.Response:
    return live.post("/oauth/introspect", data={"token": "x"}, auth=(client_id, secret))


def _client_failures(live: LiveServer, client_id: str = "backend") -> list[tuple[str, object]]:
    return [
        (e.type, e.data.get("reason") or e.data.get("failures"))
        for e in live.events(f"client:{client_id}")
    ]


# -- 1. client-secret guessing ----------------------------------------------------------------


def test_wrong_client_secrets_from_one_address_meet_the_throttle_and_then_the_right_one_does_too(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(address_logins=FIVE_A_MINUTE)
    answers = [_introspect(live, f"guess-{n}").status_code for n in range(5)]
    assert answers == [401] * 5
    refused = _introspect(live, f"guess-{5}")
    assert refused.status_code == 429
    assert refused.json()["error"] == "slow_down"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["Cache-Control"] == "no-store"
    # Refused before the secret is looked at: guessing on while refused learns nothing.
    assert _introspect(live, SECRET).status_code == 429
    assert _client_failures(live) == [("ClientAuthenticationFailed", "wrong_secret")] * 5
    failure = live.events("client:backend")[0]
    assert failure.data["ip"] == "127.0.0.1"
    assert str(failure.data["user_agent"]).startswith("python-requests")

    live.clock.advance(timedelta(seconds=12))  # one attempt refilled
    assert _introspect(live, SECRET).status_code == 200


def test_a_successful_client_authentication_costs_the_address_nothing(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(address_logins=FIVE_A_MINUTE)
    assert [_introspect(live, SECRET).status_code for _ in range(8)] == [200] * 8
    assert _introspect(live, "a wrong one").status_code == 401


def test_wrong_client_secrets_lock_the_client_with_an_event_and_the_lock_ends_with_its_window(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(client_lockout=THREE_WRONG)
    assert [_introspect(live, f"guess-{n}").status_code for n in range(3)] == [401] * 3
    locked = _introspect(live, SECRET)
    assert locked.status_code == 401  # the right secret is refused while the client is locked
    assert locked.json()["error"] == "invalid_client"
    assert locked.headers["WWW-Authenticate"].startswith("Basic ")
    assert _client_failures(live) == [
        ("ClientAuthenticationFailed", "wrong_secret"),
        ("ClientAuthenticationFailed", "wrong_secret"),
        ("ClientAuthenticationFailed", "wrong_secret"),
        ("ClientLocked", 3),
        ("ClientAuthenticationFailed", "locked"),
    ]
    live.clock.advance(timedelta(minutes=15))
    assert _introspect(live, SECRET).status_code == 200


def test_the_token_and_revocation_endpoints_count_wrong_client_secrets_too(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(address_logins=FIVE_A_MINUTE)
    token = {"grant_type": "refresh_token", "refresh_token": "x"}
    statuses = [
        live.post("/oauth/token", data=token, auth=("backend", "guess-1")).status_code,
        live.post("/oauth/revoke", data={"token": "x"}, auth=("backend", "guess-2")).status_code,
        live.post(
            "/oauth/token",
            data={**token, "client_id": "backend", "client_secret": "guess-3"},
        ).status_code,
    ]
    assert statuses == [401, 401, 401]
    assert len(_client_failures(live)) == 3


def test_an_unknown_client_id_is_answered_and_recorded_as_a_wrong_secret_is(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(address_logins=FIVE_A_MINUTE)
    unknown = _introspect(live, "guess", client_id="no-such-client")
    known = _introspect(live, "guess")
    assert (unknown.status_code, unknown.json()) == (known.status_code, known.json())
    assert unknown.headers["WWW-Authenticate"] == known.headers["WWW-Authenticate"]
    assert _client_failures(live, "no-such-client") == [
        ("ClientAuthenticationFailed", "unknown_client")
    ]
    # Both count against the address.
    assert [_introspect(live, "guess", "other").status_code for _ in range(3)] == [401] * 3
    assert _introspect(live, SECRET).status_code == 429


def test_a_public_client_that_sends_a_secret_is_refused_and_recorded(live: LiveServer) -> None:
    response = _introspect(live, "anything", client_id="spa")
    assert response.status_code == 401
    assert _client_failures(live, "spa") == [("ClientAuthenticationFailed", "not_confidential")]


def test_a_client_secret_is_stored_as_its_keyed_hash_and_verified_without_argon2(
    live: LiveServer, pool: ConnectionPool
) -> None:
    backend = live.accounts.client("backend")
    assert backend is not None
    assert backend.secret_hash is not None
    assert backend.secret_hash.startswith("hmac-sha256$")
    assert SECRET not in backend.secret_hash
    assert _introspect(live, SECRET).status_code == 200
    # Another server key would not verify it: the hash is keyed, not a plain digest.
    other = Accounts(pool, secret_key=b"\x00" * 32)
    assert not other.check_secret(backend, SECRET)
    assert Accounts(pool, secret_key=client_secret_key(pool)).check_secret(backend, SECRET)


def test_a_legacy_argon2_client_secret_still_works_and_is_replaced_by_its_keyed_hash(
    live: LiveServer, pool: ConnectionPool
) -> None:
    legacy = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash("old-secret-123456")
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO clients (client_id, secret_hash, grants) VALUES (%s, %s, %s)",
            ("old", legacy, ["refresh_token"]),
        )
    assert _introspect(live, "wrong-secret", client_id="old").status_code == 401
    assert _stored_hash(pool, "old") == legacy  # a wrong secret changes nothing
    assert _introspect(live, "old-secret-123456", client_id="old").status_code == 200
    migrated = _stored_hash(pool, "old")
    assert migrated.startswith("hmac-sha256$")
    accounts = Accounts(pool, secret_key=client_secret_key(pool))
    assert accounts.secret_hash("old-secret-123456") == migrated
    assert _introspect(live, "old-secret-123456", client_id="old").status_code == 200
    assert _introspect(live, "wrong-secret", client_id="old").status_code == 401


def _stored_hash(pool: ConnectionPool, client_id: str) -> str:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT secret_hash FROM clients WHERE client_id = %s", (client_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize(
    ("secret", "accepted"),
    [
        ("Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF5g", True),  # 32 base64url characters
        ("3f9a1c7e5b2d8f4a6c0e9b1d7f3a5c8e", True),  # 128 bits of hex
        ("7f3a9c2e5b1d8f4a", False),  # 64 bits of hex
        ("s3cret", False),
        ("ab" * 40, False),  # long, but two characters
    ],
)
def test_a_supplied_client_secret_needs_128_bits(
    pool: ConnectionPool, secret: str, accepted: bool
) -> None:
    accounts = Accounts(pool, CHEAP_HASHER, secret_key=client_secret_key(pool))
    assert (secret_bits(secret) >= MIN_SECRET_BITS) is accepted
    if accepted:
        accounts.add_client("supplied", secret, ("refresh_token",))
        return
    with pytest.raises(AccountError, match="at least 128 are needed") as refused:
        accounts.add_client("supplied", secret, ("refresh_token",))
    assert secret not in str(refused.value)
