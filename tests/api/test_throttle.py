"""The per-address login rate limit: the GCRA rule on its own, address grouping, and the 429 that
/oauth/token and /browser/login answer, shared across connections through PostgreSQL."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from api.ratelimit import RateLimit, address_key, admit
from api.settings import Settings, SettingsError
from tests.api.conftest import PASSWORD, LiveServer
from tests.api.test_browser_endpoints import HEADERS

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
THREE_A_MINUTE = RateLimit(limit=3, window=timedelta(minutes=1))
LOOPBACK_PROXY = (ipaddress.ip_network("127.0.0.0/8"),)

rules = st.builds(
    RateLimit,
    limit=st.integers(1, 20),
    window=st.integers(1, 3600).map(lambda s: timedelta(seconds=s)),
)
# Attempt times as non-negative offsets (in ms) from T0, in order.
offsets = st.lists(st.integers(0, 7_200_000), max_size=60).map(sorted)


def _run(rule: RateLimit, times: list[datetime]) -> list[bool]:
    tat = None
    admitted = []
    for now in times:
        decision = admit(tat, now, rule)
        tat = decision.tat
        admitted.append(decision.is_admitted)
    return admitted


def _at(ms: list[int]) -> list[datetime]:
    return [T0 + timedelta(milliseconds=m) for m in ms]


@given(rules)
def test_a_burst_of_limit_is_admitted_and_the_next_waits_one_interval(rule: RateLimit) -> None:
    assert _run(rule, [T0] * rule.limit) == [True] * rule.limit
    tat = T0 + rule.interval * rule.limit
    refused = admit(tat, T0, rule)
    assert not refused.is_admitted
    assert refused.retry_after == rule.interval
    assert admit(tat, T0 + refused.retry_after, rule).is_admitted


@given(rules, offsets)
def test_no_stretch_of_time_admits_more_than_the_bucket_holds_plus_its_refill(
    rule: RateLimit, ms: list[int]
) -> None:
    times = _at(ms)
    admitted = [t for t, ok in zip(times, _run(rule, times), strict=True) if ok]
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            refilled = (admitted[j] - first) // rule.interval
            assert j - i + 1 <= rule.limit + refilled


@given(rules, offsets)
def test_a_refusal_names_the_exact_wait(rule: RateLimit, ms: list[int]) -> None:
    tat = None
    for now in _at(ms):
        decision = admit(tat, now, rule)
        if not decision.is_admitted:
            assert decision.tat == tat  # a refused attempt costs nothing
            assert admit(tat, now + decision.retry_after, rule).is_admitted
            earlier = now + decision.retry_after - timedelta(microseconds=1)
            assert not admit(tat, earlier, rule).is_admitted
        tat = decision.tat


@given(rules, st.integers(1, 50))
def test_attempts_at_the_sustained_rate_are_never_refused(rule: RateLimit, count: int) -> None:
    assert all(_run(rule, [T0 + rule.interval * n for n in range(count)]))


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        (None, "unknown"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_addresses_are_grouped_by_what_one_client_holds(ip: str | None, key: str) -> None:
    assert address_key(ip) == key


def _login(live: LiveServer, address: str, password: str = "wrong") -> requests.Response:
    form = {"grant_type": "password", "client_id": "spa", "username": "ada", "password": password}
    # The live servers here trust X-Forwarded-For from loopback (LOOPBACK_PROXY), as from a proxy.
    return live.post("/oauth/token", data=form, headers={"X-Forwarded-For": address})


def test_the_fourth_attempt_in_a_minute_is_429_until_the_bucket_refills(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(address_logins=THREE_A_MINUTE, trusted_proxies=LOOPBACK_PROXY)
    assert [_login(live, "203.0.113.7").status_code for _ in range(3)] == [400] * 3
    failures = live.types("principal:").count("LoginFailed")

    refused = _login(live, "203.0.113.7", PASSWORD)
    assert refused.status_code == 429
    assert refused.json()["error"] == "slow_down"
    assert refused.headers["Retry-After"] == "20"
    assert refused.headers["Cache-Control"] == "no-store"
    assert live.types("principal:").count("LoginFailed") == failures  # nothing was tried
    assert live.types("session:") == []

    assert _login(live, "198.51.100.1", PASSWORD).status_code == 200  # another address
    live.clock.advance(timedelta(seconds=19))
    assert _login(live, "203.0.113.7", PASSWORD).status_code == 429
    live.clock.advance(timedelta(seconds=1))
    assert _login(live, "203.0.113.7", PASSWORD).status_code == 200


def test_the_browser_login_shares_the_limit(live_factory: Callable[..., LiveServer]) -> None:
    live = live_factory(address_logins=THREE_A_MINUTE, trusted_proxies=LOOPBACK_PROXY)
    for _ in range(3):
        _login(live, "203.0.113.7")
    body = {"username": "ada", "password": PASSWORD, "client_id": "spa"}
    headers = {**HEADERS, "X-Forwarded-For": "203.0.113.7"}
    response = live.post("/browser/login", json=body, headers=headers)
    assert response.status_code == 429
    assert response.json()["error"] == "slow_down"
    assert int(response.headers["Retry-After"]) == 20


def test_parallel_attempts_from_one_address_admit_exactly_the_limit(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(
        address_logins=RateLimit(limit=5, window=timedelta(minutes=1)),
        trusted_proxies=LOOPBACK_PROXY,
    )
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda _: _login(live, "203.0.113.9").status_code, range(20)))
    assert sorted(statuses) == [400] * 5 + [429] * 15


def test_addresses_whose_bucket_is_full_again_are_forgotten(
    live_factory: Callable[..., LiveServer],
) -> None:
    live = live_factory(address_logins=THREE_A_MINUTE, trusted_proxies=LOOPBACK_PROXY)
    _login(live, "203.0.113.7")
    with live.pool.connection() as conn:
        assert conn.execute("SELECT address FROM login_throttle").fetchall() == [("203.0.113.7",)]
        live.clock.advance(timedelta(minutes=2))
        _login(live, "198.51.100.1")
        assert conn.execute("SELECT address FROM login_throttle").fetchall() == [("198.51.100.1",)]


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"LEDGER_ADDRESS_LOGIN_LIMIT": "0"}, "LEDGER_ADDRESS_LOGIN_LIMIT"),
        ({"LEDGER_ADDRESS_LOGIN_LIMIT": "ten"}, "LEDGER_ADDRESS_LOGIN_LIMIT"),
        ({"LEDGER_ADDRESS_LOGIN_LIMIT": "1000001"}, "LEDGER_ADDRESS_LOGIN_LIMIT"),
        ({"LEDGER_ADDRESS_LOGIN_WINDOW": "0s"}, "LEDGER_ADDRESS_LOGIN_WINDOW"),
        ({"LEDGER_ADDRESS_LOGIN_WINDOW": "soon"}, "LEDGER_ADDRESS_LOGIN_WINDOW"),
    ],
)
def test_bad_rate_limit_settings_are_refused_by_name(environ: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(environ)


def test_rate_limit_settings_are_read() -> None:
    environ = {"LEDGER_ADDRESS_LOGIN_LIMIT": "100", "LEDGER_ADDRESS_LOGIN_WINDOW": "10m"}
    assert Settings.from_env(environ).address_logins == RateLimit(100, timedelta(minutes=10))
    assert Settings.from_env({}).address_logins == RateLimit(30, timedelta(minutes=1))
