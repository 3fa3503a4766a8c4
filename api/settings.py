from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from projections.principal import MAX_TRACKED_FAILURES, LockoutPolicy
from projections.session import Policy

DEFAULT_DATA_DIR = Path(".session-ledger/pgdata")
_DURATION = re.compile(r"(\d{1,9})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class SettingsError(ValueError):
    """Raised at start-up for a missing or malformed environment variable; names it."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable, read once from LEDGER_* environment variables at start-up."""

    database_url: str | None = None
    """PostgreSQL URL (LEDGER_DATABASE_URL); None starts the embedded server."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Data directory of the embedded server (LEDGER_DATA_DIR)."""
    issuer: str = "http://127.0.0.1:8000"
    """`iss` of access tokens and the base of the metadata's URLs (LEDGER_ISSUER)."""
    audience: str = "session-ledger"
    """`aud` of access tokens (LEDGER_AUDIENCE)."""
    policy: Policy = field(default_factory=Policy)
    """Session rules (LEDGER_ACCESS_TOKEN_TTL, LEDGER_IDLE_TIMEOUT, LEDGER_ABSOLUTE_TIMEOUT,
    LEDGER_REFRESH_GRACE, LEDGER_ACTIVITY_DEBOUNCE, LEDGER_REFRESH_COUNTS_AS_ACTIVITY)."""
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    """Failed-login lockout (LEDGER_LOGIN_MAX_FAILURES, LEDGER_LOGIN_FAILURE_WINDOW)."""
    key_encryption_key: str | None = field(default=None, repr=False)
    """Passphrase sealing private keys at rest (LEDGER_KEY_ENCRYPTION_KEY); None stores them
    unsealed."""
    key_reload_interval: timedelta = timedelta(seconds=60)
    """How often a running server re-reads the signing keys, so `keys rotate` reaches it."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults, lockout = Policy(), LockoutPolicy()
        policy = Policy(
            access_token_ttl=_duration(env, "LEDGER_ACCESS_TOKEN_TTL", defaults.access_token_ttl),
            idle_timeout=_duration(env, "LEDGER_IDLE_TIMEOUT", defaults.idle_timeout),
            absolute_timeout=_duration(env, "LEDGER_ABSOLUTE_TIMEOUT", defaults.absolute_timeout),
            refresh_grace=_duration(env, "LEDGER_REFRESH_GRACE", defaults.refresh_grace, zero=True),
            activity_debounce=_duration(
                env, "LEDGER_ACTIVITY_DEBOUNCE", defaults.activity_debounce, zero=True
            ),
            refresh_counts_as_activity=_flag(env, "LEDGER_REFRESH_COUNTS_AS_ACTIVITY", True),
        )
        return cls(
            database_url=_optional_text(env, "LEDGER_DATABASE_URL"),
            data_dir=Path(_optional_text(env, "LEDGER_DATA_DIR") or DEFAULT_DATA_DIR),
            issuer=_url(env, "LEDGER_ISSUER", cls.issuer),
            audience=_optional_text(env, "LEDGER_AUDIENCE") or cls.audience,
            policy=policy,
            lockout=LockoutPolicy(
                max_failures=_count(env, "LEDGER_LOGIN_MAX_FAILURES", lockout.max_failures),
                window=_duration(env, "LEDGER_LOGIN_FAILURE_WINDOW", lockout.window),
            ),
            key_encryption_key=_optional_text(env, "LEDGER_KEY_ENCRYPTION_KEY"),
        )


def parse_duration(text: str) -> timedelta:
    """Seconds (`90`) or a number with a unit: `90s`, `15m`, `8h`, `2d`."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use seconds or 90s, 15m, 8h, 2d)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _optional_text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    if not value.strip():
        raise SettingsError(f"{name} is set but empty; unset it or give a value")
    return value.strip()


def _duration(
    env: Mapping[str, str], name: str, default: timedelta, *, zero: bool = False
) -> timedelta:
    text = _optional_text(env, name)
    if text is None:
        return default
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None
    if value <= timedelta(0) and not zero:
        raise SettingsError(f"{name} must be longer than zero")
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    text = _optional_text(env, name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_TRACKED_FAILURES:
        raise SettingsError(f"{name} must be a whole number from 1 to {MAX_TRACKED_FAILURES}")
    return int(text)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = _optional_text(env, name)
    if text is None:
        return default
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name} must be true or false, not {text!r}")
    return text.lower() in ("true", "1", "yes")


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    text = _optional_text(env, name)
    if text is None:
        return default
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise SettingsError(f"{name} must be an http(s) URL without query or fragment")
    return text.rstrip("/")
