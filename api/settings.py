from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import platformdirs

from api.dpop import ASYMMETRIC_ALGORITHMS, DEFAULT_ALGORITHMS, DEFAULT_WINDOW
from api.ratelimit import RateLimit
from projections.principal import MAX_TRACKED_FAILURES, LockoutPolicy
from projections.session import Policy, parse_duration

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_DATA_DIR = Path(platformdirs.user_data_dir("session-ledger")) / "pgdata"
"""The embedded server's data: one per user, wherever a command is run from."""
MAX_ADDRESS_LOGIN_LIMIT = 1_000_000
CLIENT_LOCKOUT = LockoutPolicy(max_failures=20, window=timedelta(minutes=15))
"""A client's secret is generated, so a burst of wrong ones is an attack or a misconfiguration,
never a typo; the bound is higher than a user's because a locked backend fails all its users."""
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?"
    r"(?P<path>/[^\s?#]*)?",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    LEDGER_REFRESH_GRACE, LEDGER_ACTIVITY_DEBOUNCE, LEDGER_REFRESH_COUNTS_AS_ACTIVITY,
    LEDGER_REFRESH_GRACE_SAME_CLIENT)."""
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    """Failed-login lockout (LEDGER_LOGIN_MAX_FAILURES, LEDGER_LOGIN_FAILURE_WINDOW)."""
    client_lockout: LockoutPolicy = field(default_factory=lambda: CLIENT_LOCKOUT)
    """Failed client-authentication lockout (LEDGER_CLIENT_MAX_FAILURES,
    LEDGER_CLIENT_FAILURE_WINDOW)."""
    address_logins: RateLimit = field(default_factory=RateLimit)
    """Login attempts and failed client authentications per client address
    (LEDGER_ADDRESS_LOGIN_LIMIT at once, refilling at that many per LEDGER_ADDRESS_LOGIN_WINDOW)."""
    key_encryption_key: str | None = field(default=None, repr=False)
    """Passphrase sealing private keys at rest (LEDGER_KEY_ENCRYPTION_KEY); None stores them
    unsealed."""
    run_projections: bool = True
    """Whether the server keeps the catch-up projections current (LEDGER_RUN_PROJECTIONS); turn
    it off when `session-ledger project` runs elsewhere."""
    expiry_sweep_interval: timedelta = timedelta(seconds=1)
    """How often the server records the expiries whose deadline has passed
    (LEDGER_EXPIRY_SWEEP_INTERVAL); 0 leaves it to `session-ledger sweep` run elsewhere."""
    feed_heartbeat: timedelta = timedelta(seconds=15)
    """The longest silence on a session-end event stream before a heartbeat comment
    (LEDGER_FEED_HEARTBEAT)."""
    dpop_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    """The JWS algorithms a DPoP proof may be signed with (LEDGER_DPOP_ALGORITHMS, asymmetric
    ones only)."""
    dpop_window: timedelta = DEFAULT_WINDOW
    """How old a DPoP proof's `iat` may be (LEDGER_DPOP_WINDOW); it may also be a few seconds
    ahead."""
    dpop_nonce: bool = False
    """Whether the token endpoint requires DPoP proofs to carry a server nonce (RFC 9449 §8,
    LEDGER_DPOP_NONCE); it answers `use_dpop_nonce` with one, and every answer names the next."""
    dpop_mismatch_revokes: bool = False
    """Whether a bound session's refresh without its key's proof also ends the session
    (LEDGER_DPOP_MISMATCH_REVOKES); it is always refused and recorded."""
    min_password_length: int = 12
    """The fewest characters `users add` and `users set-password` accept
    (LEDGER_MIN_PASSWORD_LENGTH; NIST SP 800-63B asks for at least 8, 15 without a second
    factor)."""
    code_lifetime: timedelta = timedelta(seconds=60)
    """How long an authorization code may be redeemed (LEDGER_AUTHORIZATION_CODE_TTL)."""
    signal_push_timeout: timedelta = timedelta(seconds=5)
    """How long a Shared Signals push to a receiver may take before it counts as failed and is
    retried (LEDGER_SIGNAL_PUSH_TIMEOUT)."""
    signal_long_poll: timedelta = timedelta(seconds=10)
    """How long a Shared Signals poll without `returnImmediately` waits for an event
    (LEDGER_SIGNAL_LONG_POLL)."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Reverse proxies whose X-Forwarded-For names the client (LEDGER_TRUSTED_PROXIES: addresses
    or networks); from anyone else the header is ignored."""
    allowed_origins: tuple[str, ...] = ()
    """Origins whose pages may call the cookie-authenticated browser endpoints
    (LEDGER_ALLOWED_ORIGINS); empty means the issuer's origin only (see `browser_origins`)."""
    demo: bool = False
    """Serve the demo single-page app at /demo (LEDGER_DEMO; `serve --demo` sets it)."""
    metrics_token: str | None = field(default=None, repr=False)
    """A bearer token that GET /metrics then requires (LEDGER_METRICS_TOKEN); unset, /metrics is
    open to whoever reaches the port."""
    api_docs: bool = False
    """Serve FastAPI's interactive API pages at /docs (LEDGER_API_DOCS). Off by default: they
    load Swagger UI from a public CDN, without subresource integrity."""
    access_log: bool = False
    """Log a line per request (LEDGER_ACCESS_LOG). Off by default: it costs a share of every
    request, and the ledger itself is the audit trail."""

    @property
    def browser_origins(self) -> tuple[str, ...]:
        """The origins the browser endpoints accept: the allow-list, else the issuer's origin."""
        if self.allowed_origins:
            return self.allowed_origins
        try:
            return (normalize_origin(self.issuer, path_allowed=True),)
        except ValueError:  # an issuer no browser could send as Origin: refuse every page
            return ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults, lockout, per_address = Policy(), LockoutPolicy(), RateLimit()
        policy = Policy(
            access_token_ttl=_duration(env, "LEDGER_ACCESS_TOKEN_TTL", defaults.access_token_ttl),
            idle_timeout=_duration(env, "LEDGER_IDLE_TIMEOUT", defaults.idle_timeout),
            absolute_timeout=_duration(env, "LEDGER_ABSOLUTE_TIMEOUT", defaults.absolute_timeout),
            refresh_grace=_duration(env, "LEDGER_REFRESH_GRACE", defaults.refresh_grace, zero=True),
            activity_debounce=_duration(
                env, "LEDGER_ACTIVITY_DEBOUNCE", defaults.activity_debounce, zero=True
            ),
            refresh_counts_as_activity=_flag(env, "LEDGER_REFRESH_COUNTS_AS_ACTIVITY", True),
            refresh_grace_same_client=_flag(env, "LEDGER_REFRESH_GRACE_SAME_CLIENT", False),
        )
        return cls(
            database_url=_optional_text(env, "LEDGER_DATABASE_URL"),
            data_dir=Path(_optional_text(env, "LEDGER_DATA_DIR") or DEFAULT_DATA_DIR),
            issuer=_url(env, "LEDGER_ISSUER", cls.issuer),
            audience=_optional_text(env, "LEDGER_AUDIENCE") or cls.audience,
            policy=policy,
            lockout=LockoutPolicy(
                max_failures=_count(
                    env, "LEDGER_LOGIN_MAX_FAILURES", lockout.max_failures, MAX_TRACKED_FAILURES
                ),
                window=_duration(env, "LEDGER_LOGIN_FAILURE_WINDOW", lockout.window),
            ),
            client_lockout=LockoutPolicy(
                max_failures=_count(
                    env,
                    "LEDGER_CLIENT_MAX_FAILURES",
                    CLIENT_LOCKOUT.max_failures,
                    MAX_TRACKED_FAILURES,
                ),
                window=_duration(env, "LEDGER_CLIENT_FAILURE_WINDOW", CLIENT_LOCKOUT.window),
            ),
            address_logins=RateLimit(
                limit=_count(
                    env, "LEDGER_ADDRESS_LOGIN_LIMIT", per_address.limit, MAX_ADDRESS_LOGIN_LIMIT
                ),
                window=_duration(env, "LEDGER_ADDRESS_LOGIN_WINDOW", per_address.window),
            ),
            key_encryption_key=_optional_text(env, "LEDGER_KEY_ENCRYPTION_KEY"),
            run_projections=_flag(env, "LEDGER_RUN_PROJECTIONS", True),
            expiry_sweep_interval=_duration(
                env, "LEDGER_EXPIRY_SWEEP_INTERVAL", timedelta(seconds=1), zero=True
            ),
            feed_heartbeat=_duration(env, "LEDGER_FEED_HEARTBEAT", timedelta(seconds=15)),
            dpop_algorithms=_dpop_algorithms(env, "LEDGER_DPOP_ALGORITHMS"),
            dpop_window=_duration(env, "LEDGER_DPOP_WINDOW", DEFAULT_WINDOW),
            dpop_nonce=_flag(env, "LEDGER_DPOP_NONCE", False),
            dpop_mismatch_revokes=_flag(env, "LEDGER_DPOP_MISMATCH_REVOKES", False),
            min_password_length=_count(env, "LEDGER_MIN_PASSWORD_LENGTH", 12, 1024),
            code_lifetime=_duration(env, "LEDGER_AUTHORIZATION_CODE_TTL", timedelta(seconds=60)),
            signal_push_timeout=_duration(env, "LEDGER_SIGNAL_PUSH_TIMEOUT", timedelta(seconds=5)),
            signal_long_poll=_duration(env, "LEDGER_SIGNAL_LONG_POLL", timedelta(seconds=10)),
            trusted_proxies=_networks(env, "LEDGER_TRUSTED_PROXIES"),
            allowed_origins=_origins(env, "LEDGER_ALLOWED_ORIGINS"),
            demo=_flag(env, "LEDGER_DEMO", False),
            metrics_token=_optional_text(env, "LEDGER_METRICS_TOKEN"),
            api_docs=_flag(env, "LEDGER_API_DOCS", False),
            access_log=_flag(env, "LEDGER_ACCESS_LOG", False),
        )


def normalize_origin(text: str, *, path_allowed: bool = False) -> str:
    """`scheme://host[:port]` as browsers send it in Origin: lower case, no default port."""
    match = _ORIGIN.fullmatch(text.strip())
    if match is None or (match["path"] and not path_allowed):
        raise ValueError(f"{text!r} is not an origin (http(s)://host[:port], without a path)")
    scheme, host, port = match["scheme"].lower(), match["host"].lower(), match["port"]
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} has an invalid port")
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def _optional_text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    if not value.strip():
        raise SettingsError(f"{name} is set but empty; unset it or give a value")
    return value.strip()


def _dpop_algorithms(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    text = _optional_text(env, name)
    if text is None:
        return DEFAULT_ALGORITHMS
    algorithms = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
    if not algorithms or unknown:
        allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
        raise SettingsError(f"{name}: each algorithm must be one of {allowed}")
    return algorithms


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


def _count(env: Mapping[str, str], name: str, default: int, most: int) -> int:
    text = _optional_text(env, name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise SettingsError(f"{name} must be a whole number from 1 to {most}")
    return int(text)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = _optional_text(env, name)
    if text is None:
        return default
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name} must be true or false, not {text!r}")
    return text.lower() in ("true", "1", "yes")


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    text = _optional_text(env, name)
    if text is None:
        return ()
    try:
        return tuple(dict.fromkeys(normalize_origin(item) for item in text.split(",")))
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    text = _optional_text(env, name)
    if text is None:
        return ()
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in text.split(","))
    except ValueError as e:
        raise SettingsError(f"{name}: {e} (addresses or networks, comma-separated)") from None


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    text = _optional_text(env, name)
    if text is None:
        return default
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise SettingsError(f"{name} must be an http(s) URL without query or fragment")
    return text.rstrip("/")
