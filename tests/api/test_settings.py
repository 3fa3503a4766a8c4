"""Settings from the environment: defaults, durations, and errors that name the variable."""

from __future__ import annotations

from datetime import timedelta

import pytest

from api.settings import Settings, SettingsError
from projections.session import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", timedelta(seconds=90)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("8h", timedelta(hours=8)),
        ("2d", timedelta(days=2)),
        (" 10s ", timedelta(seconds=10)),
    ],
)
def test_durations_are_seconds_or_carry_a_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1.5m", "-5s", "15 m", "15min", "m", "1e3"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_defaults_follow_the_design() -> None:
    settings = Settings.from_env({})
    policy = settings.policy
    assert settings.database_url is None
    assert policy.access_token_ttl == timedelta(minutes=15)
    assert policy.idle_timeout == timedelta(minutes=60)
    assert policy.absolute_timeout == timedelta(hours=8)
    assert policy.refresh_grace == timedelta(seconds=10)
    assert policy.activity_debounce == timedelta(seconds=60)
    assert policy.refresh_counts_as_activity is True
    assert (settings.lockout.max_failures, settings.lockout.window) == (5, timedelta(minutes=15))
    client_lockout = settings.client_lockout
    assert (client_lockout.max_failures, client_lockout.window) == (20, timedelta(minutes=15))


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "LEDGER_DATABASE_URL": "postgresql://ledger@db/ledger",
            "LEDGER_ISSUER": "https://auth.example.com/",
            "LEDGER_AUDIENCE": "api.example.com",
            "LEDGER_ACCESS_TOKEN_TTL": "5m",
            "LEDGER_IDLE_TIMEOUT": "30m",
            "LEDGER_ABSOLUTE_TIMEOUT": "12h",
            "LEDGER_REFRESH_GRACE": "0",
            "LEDGER_ACTIVITY_DEBOUNCE": "30s",
            "LEDGER_REFRESH_COUNTS_AS_ACTIVITY": "false",
            "LEDGER_REFRESH_GRACE_SAME_CLIENT": "true",
            "LEDGER_LOGIN_MAX_FAILURES": "3",
            "LEDGER_LOGIN_FAILURE_WINDOW": "1h",
            "LEDGER_CLIENT_MAX_FAILURES": "10",
            "LEDGER_CLIENT_FAILURE_WINDOW": "5m",
            "LEDGER_KEY_ENCRYPTION_KEY": "a passphrase",
            "LEDGER_METRICS_TOKEN": "a scrape token",
            "LEDGER_API_DOCS": "true",
            "LEDGER_SIGNAL_PUSH_TIMEOUT": "3s",
            "LEDGER_SIGNAL_LONG_POLL": "30s",
            "LEDGER_DPOP_ALGORITHMS": "EdDSA, ES384",
            "LEDGER_DPOP_WINDOW": "2m",
            "LEDGER_DPOP_NONCE": "true",
            "LEDGER_DPOP_MISMATCH_REVOKES": "true",
        }
    )
    assert settings.issuer == "https://auth.example.com"
    assert settings.audience == "api.example.com"
    assert settings.policy.access_token_ttl == timedelta(minutes=5)
    assert settings.policy.idle_timeout == timedelta(minutes=30)
    assert settings.policy.absolute_timeout == timedelta(hours=12)
    assert settings.policy.refresh_grace == timedelta(0)
    assert settings.policy.activity_debounce == timedelta(seconds=30)
    assert settings.policy.refresh_counts_as_activity is False
    assert settings.policy.refresh_grace_same_client is True
    assert (settings.lockout.max_failures, settings.lockout.window) == (3, timedelta(hours=1))
    client_lockout = settings.client_lockout
    assert (client_lockout.max_failures, client_lockout.window) == (10, timedelta(minutes=5))
    assert settings.key_encryption_key == "a passphrase"
    assert "a passphrase" not in repr(settings)
    assert (settings.metrics_token, settings.api_docs) == ("a scrape token", True)
    assert "a scrape token" not in repr(settings)
    assert settings.signal_push_timeout == timedelta(seconds=3)
    assert settings.signal_long_poll == timedelta(seconds=30)
    assert settings.dpop_algorithms == ("EdDSA", "ES384")
    assert settings.dpop_window == timedelta(minutes=2)
    assert (settings.dpop_nonce, settings.dpop_mismatch_revokes) == (True, True)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEDGER_IDLE_TIMEOUT", "ten minutes"),
        ("LEDGER_ACCESS_TOKEN_TTL", "0"),
        ("LEDGER_ABSOLUTE_TIMEOUT", ""),
        ("LEDGER_LOGIN_MAX_FAILURES", "0"),
        ("LEDGER_LOGIN_MAX_FAILURES", "100"),
        ("LEDGER_CLIENT_MAX_FAILURES", "33"),
        ("LEDGER_CLIENT_FAILURE_WINDOW", "soon"),
        ("LEDGER_REFRESH_COUNTS_AS_ACTIVITY", "maybe"),
        ("LEDGER_REFRESH_GRACE_SAME_CLIENT", "yes please"),
        ("LEDGER_ISSUER", "auth.example.com"),
        ("LEDGER_ISSUER", "https://auth.example.com/?x=1"),
        ("LEDGER_SIGNAL_PUSH_TIMEOUT", "0"),
        ("LEDGER_SIGNAL_LONG_POLL", "forever"),
        ("LEDGER_DPOP_ALGORITHMS", "HS256"),
        ("LEDGER_DPOP_ALGORITHMS", "none"),
        ("LEDGER_DPOP_ALGORITHMS", ","),
        ("LEDGER_DPOP_NONCE", "sometimes"),
    ],
)
def test_an_invalid_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_allowed_origins_are_read_and_normalized() -> None:
    listed = "https://App.example.com:443, http://127.0.0.1:8000,http://[::1]"
    settings = Settings.from_env({"LEDGER_ALLOWED_ORIGINS": listed})
    expected = ("https://app.example.com", "http://127.0.0.1:8000", "http://[::1]")
    assert settings.allowed_origins == expected
    assert settings.browser_origins == expected


def test_without_allowed_origins_only_the_issuers_origin_is_allowed() -> None:
    assert Settings.from_env({}).allowed_origins == ()
    assert Settings.from_env({}).browser_origins == ("http://127.0.0.1:8000",)
    behind_proxy = Settings.from_env({"LEDGER_ISSUER": "https://auth.example.com/ledger"})
    assert behind_proxy.browser_origins == ("https://auth.example.com",)


@pytest.mark.parametrize(
    "value",
    [
        "https://app.example.com/",
        "https://app.example.com/spa",
        "app.example.com",
        "ftp://app.example.com",
        "https://app.example.com:99999",
        "https://a.example.com,,https://b.example.com",
        "*",
    ],
)
def test_an_allowed_origin_with_a_path_or_no_scheme_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="LEDGER_ALLOWED_ORIGINS"):
        Settings.from_env({"LEDGER_ALLOWED_ORIGINS": value})


def test_demo_mode_is_off_unless_asked_for() -> None:
    assert Settings.from_env({}).demo is False
    assert Settings.from_env({"LEDGER_DEMO": "1"}).demo is True
    with pytest.raises(SettingsError, match="LEDGER_DEMO"):
        Settings.from_env({"LEDGER_DEMO": "maybe"})


def test_the_access_log_is_off_unless_asked_for() -> None:
    assert Settings.from_env({}).access_log is False
    assert Settings.from_env({"LEDGER_ACCESS_LOG": "true"}).access_log is True
    with pytest.raises(SettingsError, match="LEDGER_ACCESS_LOG"):
        Settings.from_env({"LEDGER_ACCESS_LOG": "sometimes"})
