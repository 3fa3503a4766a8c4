"""Access tokens (JWT after RFC 9068) and opaque refresh tokens derived from a server key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from api.errors import InvalidToken
from api.keys import KeyRing
from ledger.clock import require_aware

ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
CLOCK_SKEW = timedelta(seconds=30)
"""How far ahead of the verifier's clock a token's `iat` or `nbf` may be (RFC 7519 §4.1.5 allows
some leeway): servers on one database may disagree by a little, never by minutes."""
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")
"""Every access token's claims; a user's also has `sid`, its session. A client's own token (the
client_credentials grant) has none, and its `sub` is its client id."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
# Bounds that keep datetime arithmetic from overflowing on a hostile but well-signed number.
_MAX_TIMESTAMP = 2**37
_MAX_ACCESS_TOKEN_CHARS = 8192
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

_MAX_REFRESH_TOKEN_CHARS = 200
_MAX_GENERATION = 999_999_999
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# session id . generation (decimal, no sign, no leading zero) . 256-bit MAC in unpadded base64url
_REFRESH_TOKEN = re.compile(r"([A-Za-z0-9_-]{1,64})\.([1-9][0-9]{0,8})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class AccessClaims:
    subject: str
    session_id: str | None
    """None in a client's own token (client_credentials), which belongs to no session."""
    client_id: str
    scope: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    jwt_id: str
    issuer: str
    audience: str
    jkt: str | None = None
    """`cnf.jkt` (RFC 9449 §6.1): the DPoP key the token is bound to; None for a bearer token."""


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


def issue_access_token(
    keyring: KeyRing,
    *,
    issuer: str,
    audience: str,
    subject: str,
    session_id: str | None,
    client_id: str,
    scope: tuple[str, ...],
    now: datetime,
    expires_at: datetime,
    jkt: str | None = None,
) -> str:
    """A signed access token (RFC 9068); bound to the DPoP key `jkt` when given (`cnf`)."""
    if not expires_at > now:
        raise ValueError("an access token must expire after it is issued")
    if not all(is_scope_token(token) for token in scope):
        raise ValueError("scope tokens must be non-empty printable ASCII without spaces")
    key = keyring.current
    claims: dict[str, object] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        # Rounded down: the token never outlives the session state it was issued from.
        "exp": _seconds(expires_at),
        "iat": _seconds(now),
        "jti": secrets.token_urlsafe(16),
        "client_id": client_id,
        "scope": " ".join(scope),
    }
    if session_id is not None:
        claims["sid"] = session_id
    if jkt is not None:
        claims["cnf"] = {"jkt": jkt}
    headers = {"typ": "at+jwt", "kid": key.kid}
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers=headers)


def verify_access_token(
    keyring: KeyRing, token: str, *, issuer: str, audience: str, now: datetime
) -> AccessClaims:
    # Security contract: every failure, whatever its cause, raises InvalidToken and nothing else.
    require_aware(now)  # a naive `now` is the caller's bug, not the token's: ValueError
    header = _unverified_header(token)
    _check_type(header)
    claims = _verified_claims(keyring, token, header)
    _check_required(claims)
    if claims["iss"] != issuer:
        raise InvalidToken("wrong issuer")
    if not _has_audience(claims["aud"], audience):
        raise InvalidToken("wrong audience")
    expires_at = _timestamp(claims, "exp")
    if not now < expires_at:
        raise InvalidToken("token has expired")
    issued_at = _timestamp(claims, "iat")
    if issued_at > now + CLOCK_SKEW:
        raise InvalidToken("token issued in the future")
    if "nbf" in claims and _timestamp(claims, "nbf") > now + CLOCK_SKEW:
        raise InvalidToken("token not valid yet (nbf)")
    return AccessClaims(
        subject=str(claims["sub"]),
        session_id=None if "sid" not in claims else str(claims["sid"]),
        client_id=str(claims["client_id"]),
        scope=_scope(claims.get("scope", "")),
        issued_at=issued_at,
        expires_at=expires_at,
        jwt_id=str(claims["jti"]),
        issuer=issuer,
        audience=audience,
        jkt=_jkt(claims),
    )


def _jkt(claims: Mapping[str, object]) -> str | None:
    confirmation = claims.get("cnf")
    if confirmation is None:
        return None
    jkt = confirmation.get("jkt") if isinstance(confirmation, dict) else None
    if not isinstance(jkt, str) or not jkt:
        raise InvalidToken("malformed cnf claim")
    return jkt


def refresh_token(secret: bytes, session_id: str, generation: int) -> str:
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError("a session id is 1 to 64 characters of unpadded base64url")
    if not 1 <= generation <= _MAX_GENERATION:
        raise ValueError(f"a generation is between 1 and {_MAX_GENERATION}")
    return f"{session_id}.{generation}.{_refresh_mac(secret, session_id, generation)}"


def parse_refresh_token(secret: bytes, token: str) -> tuple[str, int]:
    # Strict shape first: one valid spelling per (session, generation), so a changed token can
    # never verify, and nothing unbounded reaches the MAC.
    match = None
    if len(token) <= _MAX_REFRESH_TOKEN_CHARS:
        match = _REFRESH_TOKEN.fullmatch(token)
    if match is None:
        raise InvalidToken("malformed refresh token")
    session_id, generation, mac = match[1], int(match[2]), match[3]
    if not hmac.compare_digest(mac, _refresh_mac(secret, session_id, generation)):
        raise InvalidToken("refresh token does not verify")
    return session_id, generation


def refresh_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _refresh_mac(secret: bytes, session_id: str, generation: int) -> str:
    if len(secret) < 32:
        raise ValueError("the refresh-token key must be at least 32 bytes")
    message = f"refresh:{session_id}:{generation}".encode("ascii")
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _unverified_header(token: str) -> Mapping[str, object]:
    if not isinstance(token, str) or len(token) > _MAX_ACCESS_TOKEN_CHARS:
        raise InvalidToken("malformed token")
    try:
        return jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidToken("malformed token") from None


def _check_type(header: Mapping[str, object]) -> None:
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise InvalidToken("not an access token (typ)")


def _verified_claims(
    keyring: KeyRing, token: str, header: Mapping[str, object]
) -> Mapping[str, object]:
    kid = header.get("kid")
    key = keyring.for_kid(kid) if isinstance(kid, str) else None
    if key is None:
        raise InvalidToken("unknown signing key")
    try:
        # The algorithm is pinned by the key, never taken from the header; the claims are
        # checked below against the caller's `now`, not pyjwt's clock.
        return jwt.decode(
            token,
            key.private_key.public_key(),
            algorithms=[key.algorithm],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,
                "verify_iss": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
        raise InvalidToken("signature does not verify") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidToken("malformed token") from None


def _check_required(claims: Mapping[str, object]) -> None:
    for name in REQUIRED_CLAIMS:
        if name not in claims:
            raise InvalidToken(f"missing claim {name}")
    for name in ("iss", "sub", "jti", "client_id", "sid"):
        if name in claims and not isinstance(claims[name], str):
            raise InvalidToken(f"malformed claim {name}")
    if "sid" not in claims and claims["sub"] != claims["client_id"]:
        raise InvalidToken("a token without a session is its client's own (sub = client_id)")


def _has_audience(claim: object, audience: str) -> bool:
    if isinstance(claim, list):
        return audience in claim
    return claim == audience


def _timestamp(claims: Mapping[str, object], name: str) -> datetime:
    value = claims[name]
    # bool is an int in Python; JSON true is no timestamp.
    if type(value) is not int or not 0 <= value < _MAX_TIMESTAMP:
        raise InvalidToken(f"malformed claim {name}")
    return _EPOCH + value * _SECOND


def is_scope_token(text: str) -> bool:
    """RFC 6749 §3.3 scope-token: one or more printable ASCII characters but space, '"', '\\'."""
    return _SCOPE_TOKEN.fullmatch(text) is not None


def _scope(claim: object) -> tuple[str, ...]:
    if not isinstance(claim, str):
        raise InvalidToken("malformed claim scope")
    scope = tuple(claim.split(" ")) if claim else ()
    if not all(is_scope_token(token) for token in scope):
        raise InvalidToken("malformed claim scope")
    return scope


def _seconds(moment: datetime) -> int:
    require_aware(moment)
    return (moment - _EPOCH) // _SECOND
