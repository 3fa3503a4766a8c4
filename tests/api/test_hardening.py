"""Findings of an adversarial review of the running service, one test (or a few) per finding,
named after what was tried. Each ran against a real server over HTTP on loopback.

1. Client-secret guessing: unlimited tries, each an argon2 hash that a flood turned into a way
   to exhaust the server.
2. Privilege changes never reached live sessions: a user's removed scope, the user removed and
   re-created, kept refreshing with the old scope.
3. Any local process picked its own client address through X-Forwarded-For (the default
   server's case is in test_serve.py; here, proxies that are trusted).
4. Unbounded metric series from made-up request methods.
5. The grace window hid a thief: a spent refresh token replayed from elsewhere got the successor
   silently, and the reuse evidence later named the owner.
6. Trailing-slash redirects built from a forged Host header.
11. Framework defaults: answers without no-store or nosniff, Swagger from a CDN, a demo page
    without script-src, credentials accepted in query strings.
7. 500s from out-of-range cursors and times.
8. Two refresh cookies in one request: the last one was used.
9. Claims the verification ignored: nbf, a future iat (in test_tokens.py), and sub and client_id
   against the session row (here).
10. User names that look alike: `lockme`, `LOCKME` and `I0ckme` could all be created.
14. Any confidential client could introspect any client's tokens.
(12, the demo account on a shared database, is in test_serve.py, which runs `serve` itself.)
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import ipaddress
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

import jwt
import psycopg
import pytest
import requests
from argon2 import PasswordHasher
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from api.accounts import (
    INTROSPECT_SCOPE,
    MIN_SECRET_BITS,
    AccountError,
    Accounts,
    name_key,
    secret_bits,
)
from api.http.browser import REFRESH_COOKIE
from api.http.dependencies import client_address
from api.keys import Sealer, load_keyring
from api.ratelimit import RateLimit
from api.sessions import BAD_LOGIN, RequestInfo
from api.tokens import issue_access_token
from api.users import UserChanges
from ledger.db import apply_schema
from ledger.errors import StorageError
from ledger.events import RefreshTokenReuseDetected
from ledger.serialization import format_timestamp
from projections.principal import LockoutPolicy
from tests.api.conftest import (
    CHEAP_HASHER,
    PASSWORD,
    SECRET,
    TEST_POLICY,
    LiveServer,
    client_secret_key,
)

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
    # All five attempts were still there: four more failures, then the bucket is empty.
    assert [_introspect(live, f"wrong-{n}").status_code for n in range(4)] == [401] * 4
    assert _introspect(live, SECRET).status_code == 429


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


def test_an_impossible_client_id_counts_against_the_address_but_names_no_stream(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(address_logins=FIVE_A_MINUTE)
    huge = "x" * 10_000
    assert [_introspect(live, "guess", client_id=huge).status_code for _ in range(5)] == [401] * 5
    assert _introspect(live, SECRET).status_code == 429
    assert not [e for e in live.events("client:") if len(e.stream_id) > 200]


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
            "INSERT INTO clients (client_id, secret_hash, grants, scopes) VALUES (%s, %s, %s, %s)",
            ("old", legacy, ["refresh_token"], [INTROSPECT_SCOPE]),
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


# -- 2. privilege changes reach live sessions --------------------------------------------------


def _changes(live: LiveServer) -> UserChanges:
    """What the `users` and `sessions` commands run, on the live server's clock (the commands
    themselves are run in test_cli.py)."""
    info = RequestInfo("cli-test", None, "session-ledger command line")
    return UserChanges(live.accounts, clock=live.clock.now, policy=live.settings.policy, info=info)


def _ends(live: LiveServer) -> list[object]:
    return [e.data["reason"] for e in live.events("session:") if e.type == "SessionEnded"]


def test_removing_a_scope_ends_the_sessions_that_hold_it_and_their_tokens_stop_working(
    live: LiveServer,
) -> None:
    live.accounts.add_user("sec", PASSWORD, ("audit", "profile"))
    audit = live.login(username="sec", scope="audit")
    profile = live.login(username="sec", scope="profile")
    assert live.get("/audit/events", headers=live.bearer(audit["access_token"])).status_code == 200

    assert _changes(live).set_scopes("sec", ["profile"]) == 1

    assert live.get("/audit/events", headers=live.bearer(audit["access_token"])).status_code == 401
    assert live.refresh(audit["refresh_token"]).status_code == 400
    assert live.refresh(profile["refresh_token"]).status_code == 200  # holds nothing it lost
    assert _ends(live) == ["scopes_changed"]
    [changed] = [e for e in live.events("principal:sec") if e.type == "UserScopesChanged"]
    assert changed.data["scopes"] == ["profile"]


def test_a_removed_and_recreated_user_has_no_old_session_left(
    live: LiveServer, db_url: str
) -> None:
    live.accounts.add_user("sec", PASSWORD, ("audit",))
    old = live.login(username="sec", scope="audit")
    assert _changes(live).remove("sec") == 1
    live.accounts.add_user("sec", "a new password entirely", ())
    assert live.refresh(old["refresh_token"]).status_code == 400
    assert live.get("/audit/events", headers=live.bearer(old["access_token"])).status_code == 401
    assert _ends(live) == ["user_removed"]
    assert "UserRemoved" in [e.type for e in live.events("principal:sec")]


def test_a_new_password_ends_every_session_of_the_user(live: LiveServer) -> None:
    first, second = live.login(), live.login()
    assert _changes(live).set_password("ada", "brand new pw") == 2
    assert [live.refresh(t["refresh_token"]).status_code for t in (first, second)] == [400, 400]
    assert _ends(live) == ["password_changed"] * 2
    assert "brand new pw" not in str([e.data for e in live.events()])
    assert live.login(password="brand new pw")["access_token"]


def test_sessions_revoke_ends_every_session_of_one_user(live: LiveServer) -> None:
    adas, bobs = [live.login(), live.login()], live.login(username="bob")
    assert _changes(live).revoke("ada") == 2
    assert [live.refresh(t["refresh_token"]).status_code for t in adas] == [400, 400]
    assert live.refresh(bobs["refresh_token"]).status_code == 200
    assert _ends(live) == ["revoked", "revoked"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("DELETE FROM users WHERE name = 'ada'", "user_removed"),
        ("UPDATE users SET scopes = '{}' WHERE name = 'ada'", "scopes_changed"),
    ],
)
def test_a_refresh_rereads_the_account_and_never_grants_more_than_the_user_holds(
    live: LiveServer, pool: ConnectionPool, change: str, reason: str
) -> None:
    tokens = live.login(scope="profile")
    with pool.connection() as conn:  # a change that ended no session (by hand, or cut short)
        conn.execute(change)
    refused = live.refresh(tokens["refresh_token"])
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    assert "session has ended" in refused.json()["error_description"]
    assert _ends(live) == [reason]
    assert live.get("/sessions", headers=live.bearer(tokens["access_token"])).status_code == 401


# -- 3. spoofed client addresses -------------------------------------------------------------------

LOOPBACK_PROXY = (ipaddress.ip_network("127.0.0.0/8"),)


def _failed_login(live: LiveServer, forwarded: str | None) -> tuple[object, object]:
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": "no"}
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    assert live.post("/oauth/token", data=form, headers=headers).status_code == 400
    failed = [e for e in live.events("principal:ada") if e.type == "LoginFailed"][-1]
    return failed.data["ip"], failed.metadata.get("peer")


def test_x_forwarded_for_is_ignored_when_no_proxy_is_trusted(live: LiveServer) -> None:
    assert _failed_login(live, "203.0.113.5") == ("127.0.0.1", None)


def test_a_trusted_proxy_names_the_client_and_is_recorded_beside_it(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(trusted_proxies=LOOPBACK_PROXY)
    assert _failed_login(live, "203.0.113.5") == ("203.0.113.5", "127.0.0.1")
    # Right to left past the trusted hops; what the client wrote further left is not believed.
    assert _failed_login(live, "198.51.100.9, 203.0.113.6, 127.0.0.2") == (
        "203.0.113.6",
        "127.0.0.1",
    )
    assert _failed_login(live, "2001:db8::1") == ("2001:db8::1", "127.0.0.1")


@pytest.mark.parametrize("forwarded", ["not-an-ip-0", "203.0.113.5:443", "", "203.0.113.5, junk"])
def test_a_malformed_forwarded_address_is_not_accepted_even_from_a_trusted_proxy(
    live_factory: LiveFactory, forwarded: str
) -> None:
    live = live_factory(trusted_proxies=LOOPBACK_PROXY)
    assert _failed_login(live, forwarded) == ("127.0.0.1", None)


def test_clients_behind_a_trusted_proxy_have_a_throttle_each(live_factory: LiveFactory) -> None:
    live = live_factory(trusted_proxies=LOOPBACK_PROXY, address_logins=FIVE_A_MINUTE)
    form = {"grant_type": "password", "client_id": "spa", "username": "bob", "password": "no"}

    def attempt(client: str) -> int:
        headers = {"X-Forwarded-For": client}
        return live.post("/oauth/token", data=form, headers=headers).status_code

    assert [attempt("203.0.113.1") for _ in range(6)] == [400] * 5 + [429]
    assert attempt("203.0.113.2") == 400  # another client behind the same proxy


addresses = st.one_of(
    st.ip_addresses().map(str), st.text(max_size=12), st.sampled_from(["127.0.0.1", "::1"])
)


@given(
    peer=addresses,
    hops=st.lists(addresses, max_size=5),
    trusted=st.lists(st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "::1/128"]), max_size=3),
)
def test_a_forwarded_client_address_is_well_formed_untrusted_and_only_from_a_trusted_peer(
    peer: str, hops: list[str], trusted: list[str]
) -> None:
    networks = tuple(ipaddress.ip_network(n) for n in trusted)
    found = client_address(peer, [", ".join(hops)] if hops else [], networks)
    if found is None:
        return
    assert any(ipaddress.ip_address(peer) in n for n in networks)
    address = ipaddress.ip_address(found)  # well-formed
    assert not any(address in n for n in networks)
    assert found in [str(ipaddress.ip_address(h.strip())) for h in hops if _is_ip(h.strip())]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- 4. unbounded metric series -----------------------------------------------------------------


def _raw(live: LiveServer, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    parts = urlsplit(live.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


# The tester sent 12 KB method names through the pure-Python parser; the compiled one (httptools)
# refuses an unknown method token itself, but still passes on a few dozen WebDAV and other ones.
# Under any server the label now comes from a closed set.
WEBDAV_AND_OTHERS = ("PROPFIND", "MKCOL", "PURGE", "SEARCH", "REPORT", "LINK", "UNLINK", "LOCK")


def test_request_methods_outside_the_known_set_share_one_metric_series(live: LiveServer) -> None:
    for method in WEBDAV_AND_OTHERS:
        assert _raw(live, method, "/oauth/token") == 405
    assert _raw(live, "X" * 12_000, "/oauth/token") == 400  # refused by the parser
    metrics = live.get("/metrics").text
    assert not [m for m in WEBDAV_AND_OTHERS if f'method="{m}"' in metrics]
    assert 'method="other"' in metrics


def test_metrics_can_require_a_bearer_token(live_factory: LiveFactory) -> None:
    live = live_factory(metrics_token="a-long-random-scrape-token")
    missing = live.get("/metrics")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert live.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scraped = live.get("/metrics", headers={"Authorization": "Bearer a-long-random-scrape-token"})
    assert scraped.status_code == 200
    assert "session_ledger_http_request_duration_seconds" in scraped.text


# -- 5. the grace window hides a thief -------------------------------------------------------------


def _refresh_from(live: LiveServer, token: str, ip: str, user_agent: str) -> requests.Response:
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": "spa"}
    headers = {"X-Forwarded-For": ip, "User-Agent": user_agent}
    return live.post("/oauth/token", data=form, headers=headers)


def test_a_thiefs_grace_retry_is_recorded_and_named_in_the_reuse_evidence(
    live_factory: LiveFactory,
) -> None:
    live = live_factory(trusted_proxies=LOOPBACK_PROXY)
    first = live.login()["refresh_token"]
    owner = ("198.51.100.10", "Firefox/140.0")
    second = _refresh_from(live, first, *owner).json()["refresh_token"]
    live.clock.advance(timedelta(seconds=2))
    stolen = _refresh_from(live, first, "203.0.113.66", "curl/8.11")
    assert stolen.json()["refresh_token"] == second  # still granted: the grace is for retries
    live.clock.advance(timedelta(minutes=1))
    assert _refresh_from(live, second, *owner).status_code == 200
    live.clock.advance(timedelta(minutes=1))
    replayed = _refresh_from(live, second, "203.0.113.66", "curl/8.11")
    assert replayed.json()["error"] == "invalid_grant"

    events = [e for e in live.events("session:") if e.type != "ActivityRecorded"]
    assert [e.type for e in events] == [
        "SessionStarted",
        "RefreshTokenRotated",
        "RefreshTokenRetried",
        "RefreshTokenRotated",
        "RefreshTokenReuseDetected",
        "SessionEnded",
    ]
    retried = events[2]
    assert retried.data == {"generation": 1, "ip": "203.0.113.66", "user_agent": "curl/8.11"}
    assert retried.metadata["peer"] == "127.0.0.1"
    evidence = events[4].event
    assert isinstance(evidence, RefreshTokenReuseDetected)
    assert (evidence.first_use["ip"], evidence.reuse["ip"]) == (owner[0], "203.0.113.66")
    assert evidence.grace_retries == (
        {
            "generation": 1,
            "at": format_timestamp(retried.occurred_at),
            "ip": "203.0.113.66",
            "user_agent": "curl/8.11",
        },
    )


def test_with_same_client_grace_a_retry_from_another_user_agent_ends_the_session(
    live_factory: LiveFactory,
) -> None:
    policy = dataclasses.replace(TEST_POLICY, refresh_grace_same_client=True)
    live = live_factory(trusted_proxies=LOOPBACK_PROXY, policy=policy)
    first = live.login()["refresh_token"]
    owner = ("198.51.100.10", "Firefox/140.0")
    second = _refresh_from(live, first, *owner).json()["refresh_token"]
    # The owner's own retry (a second tab, a lost answer) still gets the successor...
    assert _refresh_from(live, first, "198.51.100.11", owner[1]).json()["refresh_token"] == second
    # ...a retry from another user agent is reuse.
    stolen = _refresh_from(live, first, "203.0.113.66", "curl/8.11")
    assert stolen.status_code == 400
    assert "reuse detected" in stolen.json()["error_description"]
    assert _refresh_from(live, second, *owner).json()["error"] == "invalid_grant"
    [evidence] = [e.event for e in live.events("session:") if e.type == "RefreshTokenReuseDetected"]
    assert isinstance(evidence, RefreshTokenReuseDetected)
    assert [r["ip"] for r in evidence.grace_retries] == ["198.51.100.11"]
    assert evidence.reuse["user_agent"] == "curl/8.11"


# -- 6. redirects built from Host ------------------------------------------------------------------


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_forged_host(live: LiveServer) -> None:
    response = live.post(
        "/oauth/token/",
        data={"grant_type": "refresh_token"},
        headers={"Host": "evil.example"},
        allow_redirects=False,
    )
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"


# -- 7. out-of-range input ------------------------------------------------------------------------


@pytest.fixture
def auditor(live: LiveServer) -> dict[str, str]:
    live.accounts.add_user("sec", "correct horse battery staple", ("audit",))
    tokens = live.login(username="sec", scope="audit")
    return live.bearer(tokens["access_token"])


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "path",
    [
        f"/audit/events?after={_cursor('1' * 23 + ':1')}",  # what the tester sent
        f"/audit/events?after={_cursor('1:' + '9' * 19)}",
        f"/audit/events?after={_cursor('-1:0')}",
        "/audit/events?after=" + "A" * 200,
        "/audit/events?from=0001-01-01T00:00:00%2B14:00",
        "/audit/events?to=9999-12-31T23:59:59-14:00",
        "/audit/sessions/x?as_of=0001-01-01T00:00:00%2B14:00",  # what the tester sent
        "/audit/sessions/x?as_of=9999-12-31T23:59:59",
        "/audit/alerts?after=" + "9" * 23,
        "/audit/alerts?after=-1",
    ],
)
def test_out_of_range_cursors_and_times_are_400_not_500(
    live: LiveServer, auditor: dict[str, str], path: str
) -> None:
    response = live.get(path, headers=auditor)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cursor=st.one_of(
        st.text(max_size=80),
        st.tuples(st.integers(), st.integers()).map(lambda p: _cursor(f"{p[0]}:{p[1]}")),
    ),
    moment=st.one_of(
        st.text(max_size=40),
        st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    ),
)
def test_no_cursor_or_time_makes_the_audit_api_fail(
    live: LiveServer, auditor: dict[str, str], cursor: str, moment: str
) -> None:
    for path, params in (
        ("/audit/events", {"after": cursor}),
        ("/audit/events", {"from": moment, "to": moment}),
        ("/audit/sessions/some-session", {"as_of": moment}),
    ):
        response = live.get(path, params=params, headers=auditor)
        assert response.status_code in (200, 400, 404), (path, params, response.text)


# -- 8. two refresh cookies -----------------------------------------------------------------------

BROWSER = {"Origin": "https://ledger.test", "X-Requested-With": "fetch"}


def _browser_login(live: LiveServer) -> str:
    body = {"username": "ada", "password": "correct horse battery staple", "client_id": "spa"}
    response = live.http.post(f"{live.url}/browser/login", json=body, headers=BROWSER, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.cookies[REFRESH_COOKIE])


@pytest.mark.parametrize("endpoint", ["/browser/refresh", "/browser/logout"])
def test_two_refresh_cookies_in_one_request_are_refused_recorded_and_cleared(
    live: LiveServer, endpoint: str
) -> None:
    own, planted = _browser_login(live), _browser_login(live)
    cookies = f"{REFRESH_COOKIE}={planted}; {REFRESH_COOKIE}={own}"
    response = requests.post(
        live.url + endpoint,
        json={"client_id": "spa"},
        headers={**BROWSER, "Cookie": cookies},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "more than one refresh cookie" in response.json()["error_description"]
    assert f"{REFRESH_COOKIE}=" in response.headers["set-cookie"]  # cleared
    assert "Max-Age=0" in response.headers["set-cookie"]
    [refusal] = live.events("browser-refusal:")
    assert (refusal.data["endpoint"], refusal.data["reason"]) == (endpoint, "cookies")
    rotations = [e for e in live.events("session:") if e.type != "SessionStarted"]
    assert rotations == []  # neither session was refreshed nor ended


def test_the_refresh_cookie_is_host_only_so_no_sibling_subdomain_can_plant_it(
    live: LiveServer,
) -> None:
    _browser_login(live)
    [cookie] = [c for c in live.http.cookies if c.name == REFRESH_COOKIE]
    assert cookie.name.startswith("__Host-")
    assert (cookie.path, cookie.secure, cookie.domain_specified) == ("/", True, False)


# -- 9. claims checked against the session ------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "client_id"), [("bob", "spa"), ("ada", "backend"), ("mallory", "spa")]
)
def test_a_signed_token_whose_sub_or_client_id_differs_from_its_session_is_refused(
    live: LiveServer, pool: ConnectionPool, subject: str, client_id: str
) -> None:
    ada = live.login()
    sid = jwt.decode(ada["access_token"], options={"verify_signature": False})["sid"]
    now = live.clock.now()
    forged = issue_access_token(
        load_keyring(pool, Sealer(None), now),
        issuer=live.settings.issuer,
        audience=live.settings.audience,
        subject=subject,
        session_id=sid,
        client_id=client_id,
        scope=("profile",),
        now=now,
        expires_at=now + timedelta(minutes=5),
    )
    assert live.get("/sessions", headers=live.bearer(ada["access_token"])).status_code == 200
    refused = live.get("/sessions", headers=live.bearer(forged))
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    introspected = live.post("/oauth/introspect", data={"token": forged}, auth=("backend", SECRET))
    assert introspected.json() == {"active": False}


# -- 10. user names that look alike ------------------------------------------------------------


@pytest.mark.parametrize("alike", ["LOCKME", "LockMe", "I0ckme", "l0ckme", "1ockme", "lockrne"])
def test_a_user_name_that_differs_from_another_only_by_case_or_look_alikes_is_refused(
    accounts: Accounts, alike: str
) -> None:
    accounts.add_user("lockme", PASSWORD)
    with pytest.raises(AccountError, match=f"{alike!r} is too like the existing user 'lockme'"):
        accounts.add_user(alike, PASSWORD)
    with pytest.raises(AccountError, match="'lockme' already exists"):
        accounts.add_user("lockme", PASSWORD)
    accounts.add_user("lockmee", PASSWORD)  # a name that only contains another is its own


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.from_regex(r"[A-Za-z0-9._@+-]{1,40}", fullmatch=True))
def test_the_database_computes_the_look_alike_key_as_the_code_does(
    pool: ConnectionPool, name: str
) -> None:
    with pool.connection() as conn, conn.transaction(force_rollback=True):
        row = conn.execute(
            "INSERT INTO users (name, password_hash) VALUES (%s, 'x') RETURNING name_key", (name,)
        ).fetchone()
    assert row == (name_key(name),)


def test_a_login_finds_the_user_in_any_case_or_in_full_width_letters(live: LiveServer) -> None:
    live.accounts.add_user("Grace.Hopper", PASSWORD)
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "grace.hopper")
    for spelling in ("grace.hopper", "GRACE.HOPPER", full_width):
        live.login(username=spelling)
    started = [e.data["user"] for e in live.events("session:") if e.type == "SessionStarted"]
    assert started == ["Grace.Hopper"] * 3


def test_failed_logins_in_every_spelling_of_a_name_count_against_one_lockout(
    live: LiveServer,
) -> None:
    spellings = ["ADA", "Ada", "ada", "aDA", "AdA"]  # TEST lockout: five failures lock
    for spelling in spellings:
        form = {"grant_type": "password", "client_id": "spa", "username": spelling}
        response = live.post("/oauth/token", data={**form, "password": "wrong"})
        assert response.json()["error"] == "invalid_grant"
    assert [e.type for e in live.events("principal:")] == [
        *["LoginFailed"] * 5,
        "PrincipalLocked",
    ]
    assert {e.stream_id for e in live.events("principal:")} == {"principal:ada"}
    locked = live.post("/oauth/token", data={**form, "password": PASSWORD})
    assert "too many failed logins" in locked.json()["error_description"]


def test_unknown_names_share_a_lockout_by_their_normal_form(live: LiveServer) -> None:
    for spelling in ("Nobody", "NOBODY"):
        form = {"grant_type": "password", "client_id": "spa", "username": spelling}
        live.post("/oauth/token", data={**form, "password": "wrong"})
    assert {e.stream_id for e in live.events("principal:")} == {"principal:nobody"}


def test_account_commands_find_the_user_in_any_case(live: LiveServer) -> None:
    tokens = live.login(username="ada")
    assert _changes(live).set_scopes("ADA", ["profile"]) == 1
    assert live.accounts.user("ada") is not None
    assert live.refresh(tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_names_that_look_alike_already_stored_stop_the_upgrade_naming_them(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP INDEX users_name_key_idx")  # as before schema version 6
        conn.execute("ALTER TABLE users DROP COLUMN name_key")
        for name in ("lockme", "I0ckme", "ada", "ADA", "bob"):
            conn.execute("INSERT INTO users (name, password_hash) VALUES (%s, 'x')", (name,))
    with pytest.raises(StorageError, match=r"look-alike.*'ADA', 'ada'; 'I0ckme', 'lockme'"):
        apply_schema(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM users WHERE name IN ('ADA', 'I0ckme')")
    apply_schema(db_url)


# -- 14. introspection permission ------------------------------------------------------------------


def test_introspection_needs_the_tokens_introspect_client_scope(live: LiveServer) -> None:
    token = live.login()["access_token"]
    live.accounts.add_client(
        "other-backend", "Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF5g-2", ("refresh_token",)
    )
    refused = live.post(
        "/oauth/introspect",
        data={"token": token},
        auth=("other-backend", "Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF5g-2"),
    )
    assert refused.status_code == 400
    assert refused.json()["error"] == "unauthorized_client"
    assert INTROSPECT_SCOPE in refused.json()["error_description"]
    assert "active" not in refused.json()
    allowed = live.post("/oauth/introspect", data={"token": token}, auth=("backend", SECRET))
    assert allowed.json()["active"] is True


def test_a_public_client_cannot_be_given_the_introspection_scope(pool: ConnectionPool) -> None:
    with pytest.raises(AccountError, match="only a confidential client"):
        Accounts(pool).add_client("spa-2", None, ("refresh_token",), (INTROSPECT_SCOPE,))


# -- 11. framework defaults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/no-such-path"),  # the framework's 404
        ("DELETE", "/oauth/token"),  # its 405
        ("GET", "/.well-known/oauth-authorization-server"),
        ("POST", "/oauth/token"),  # a refusal
    ],
)
def test_every_answer_carries_nosniff_and_the_uncacheable_ones_no_store(
    live: LiveServer, method: str, path: str
) -> None:
    response = live.http.request(method, live.url + path, timeout=30)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


def test_the_jwks_keeps_its_own_cache_lifetime(live: LiveServer) -> None:
    response = live.get("/.well-known/jwks.json")
    assert response.headers["Cache-Control"] == "public, max-age=60"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_no_page_loads_swagger_from_a_cdn_unless_asked_for(live_factory: LiveFactory) -> None:
    live = live_factory()
    assert live.get("/docs").status_code == 404
    assert live.get("/redoc").status_code == 404
    assert live.get("/openapi.json").status_code == 200  # for tools, served from the package


@pytest.mark.parametrize(
    "query",
    [
        "access_token=eyJhbGciOi",
        "refresh_token=abc.1.def",
        "limit=5&client_secret=s3cret",
        "password=hunter2",
        "TOKEN=x",
    ],
)
def test_credentials_in_the_query_string_are_refused(live: LiveServer, query: str) -> None:
    response = live.get(f"/audit/events?{query}")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "query string" in response.json()["error_description"]
    assert query.split("=")[1] not in response.text


def test_the_demo_page_allows_only_its_own_scripts(live_factory: LiveFactory) -> None:
    live = live_factory(demo=True)
    policy = live.get("/demo").headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"].startswith("'self' 'sha256-")
    assert "'unsafe-inline'" not in policy
    assert directives["frame-ancestors"] == "'none'"


def test_removing_a_client_ends_its_sessions_and_its_tokens_stop_working(
    live: LiveServer,
) -> None:
    live.accounts.add_client("old-app", None, ("password", "refresh_token"))
    form = {"grant_type": "password", "client_id": "old-app", "username": "ada"}
    theirs = live.post("/oauth/token", data={**form, "password": PASSWORD}).json()
    ours = live.login()
    assert _changes(live).remove_client("old-app") == 1
    assert _ends(live) == ["client_removed"]
    assert [e.type for e in live.events("client:old-app")][-1] == "ClientRemoved"
    assert live.get("/sessions", headers=live.bearer(theirs["access_token"])).status_code == 401
    refused = live.refresh(theirs["refresh_token"], client_id="old-app")
    assert refused.json()["error"] == "invalid_client"
    assert live.get("/sessions", headers=live.bearer(ours["access_token"])).status_code == 200
    with pytest.raises(AccountError, match="client 'old-app' does not exist"):
        _changes(live).remove_client("old-app")


def test_a_disabled_user_cannot_log_in_and_their_sessions_end_until_enabled(
    live: LiveServer,
) -> None:
    tokens = live.login()
    assert _changes(live).disable("ada") == 1
    assert _ends(live) == ["user_disabled"]
    assert live.get("/sessions", headers=live.bearer(tokens["access_token"])).status_code == 401
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": PASSWORD}
    refused = live.post("/oauth/token", data=form)
    assert refused.json() == {"error": "invalid_grant", "error_description": BAD_LOGIN}
    failed = [e.data["reason"] for e in live.events("principal:ada") if e.type == "LoginFailed"]
    assert failed == ["disabled"]  # told apart in the record only
    _changes(live).enable("ada")
    assert live.post("/oauth/token", data=form).status_code == 200
    types = [e.type for e in live.events("principal:ada")]
    assert [t for t in types if t in ("UserDisabled", "LoginFailed", "UserEnabled")] == [
        "UserDisabled",
        "LoginFailed",
        "UserEnabled",
    ]


def test_a_session_of_a_user_disabled_behind_its_back_cannot_refresh(
    live: LiveServer, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    tokens = live.login()
    admin.execute("UPDATE users SET disabled = true WHERE name = 'ada'")
    refused = live.refresh(tokens["refresh_token"])
    assert refused.json()["error"] == "invalid_grant"
    assert "no longer exists or is disabled" in refused.json()["error_description"]
