"""DPoP proofs (RFC 9449): the checks of §4.3 on one proof, the key's RFC 7638 thumbprint, and
server nonces (§8, §9).

`check_proof` is pure: it is given the request's method and URI, the time, the access token
(on resource requests) and the nonce rule, and answers the proof's key thumbprint and `jti`, or
raises InvalidDpopProof naming the rule that failed. The `jti` replay check (§11.1), which needs
state shared by every worker, is the caller's.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt

from api.errors import InvalidDpopProof, UseDpopNonce
from api.jwk import b64url, jwk_thumbprint
from ledger.clock import require_aware

PROOF_TYPE = "dpop+jwt"
DEFAULT_ALGORITHMS = ("ES256", "EdDSA")
ASYMMETRIC_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
"""What a DPoP key may sign with (§4.2: asymmetric only, never `none` nor a MAC)."""
DEFAULT_WINDOW = timedelta(seconds=60)
DEFAULT_SKEW = timedelta(seconds=5)
MAX_PROOF_CHARS = 8192
MAX_JTI_CHARS = 256
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7638 §3.2: the required members of each key type, in the thumbprint's input.
_REQUIRED_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_MALFORMED = "the DPoP proof is not a well-formed JWT"


@dataclass(frozen=True)
class Proof:
    """A proof that passed every check of §4.3 but the replay check."""

    jkt: str
    """The RFC 7638 thumbprint of its public key (base64url SHA-256)."""
    jti: str
    issued_at: datetime


def check_proof(
    proof: str,
    *,
    method: str,
    uri: str,
    now: datetime,
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
    window: timedelta = DEFAULT_WINDOW,
    skew: timedelta = DEFAULT_SKEW,
    access_token: str | None = None,
    nonces: Nonces | None = None,
) -> Proof:
    """The proof, checked as RFC 9449 §4.3 says; InvalidDpopProof otherwise.

    `uri` is the request's URI as the server is known to clients (its issuer's origin); `iat`
    may be up to `window` old and `skew` ahead. With `access_token` (a resource request) `ath`
    must be its hash (§4.3 point 11); with `nonces`, `nonce` must be a current one (point 10),
    else UseDpopNonce names the nonce to use.
    """
    require_aware(now, "now")
    if len(proof) > MAX_PROOF_CHARS:
        raise InvalidDpopProof("the DPoP proof is too long")
    header, payload, signed, signature = _parts(proof)  # point 2: a well-formed JWT
    if "crit" in header:  # RFC 7515 §4.1.11: no extension is understood here
        raise InvalidDpopProof("the DPoP proof's header names critical extensions")
    if header.get("typ") != PROOF_TYPE:  # point 4
        raise InvalidDpopProof(f"the DPoP proof's typ must be {PROOF_TYPE}")
    algorithm = header.get("alg")
    if algorithm not in algorithms or algorithm not in ASYMMETRIC_ALGORITHMS:  # point 5
        raise InvalidDpopProof(f"the DPoP proof's alg must be one of {', '.join(algorithms)}")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidDpopProof("the DPoP proof's header has no jwk")
    if _PRIVATE_MEMBERS & set(jwk):  # point 7
        raise InvalidDpopProof("the DPoP proof's jwk holds private key material")
    key = _public_key(json.dumps(jwk, sort_keys=True), algorithm)
    if not _algorithm(algorithm).verify(signed, key, signature):  # point 6
        raise InvalidDpopProof("the DPoP proof's signature does not verify")
    claims = _json_object(payload)
    for name in ("jti", "htm", "htu", "iat"):  # point 3
        if name not in claims:
            raise InvalidDpopProof(f"the DPoP proof has no {name} claim")
    jti = claims["jti"]
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise InvalidDpopProof("the DPoP proof's jti must be a short non-empty string")
    if claims["htm"] != method:  # point 8
        raise InvalidDpopProof("the DPoP proof's htm is not this request's method")
    if not isinstance(claims["htu"], str) or normalized_uri(claims["htu"]) != normalized_uri(
        uri, query_allowed=True
    ):  # point 9
        raise InvalidDpopProof("the DPoP proof's htu is not this request's URI")
    issued_at = _issued_at(claims["iat"], now, window, skew)  # point 11's freshness
    if nonces is not None:  # point 10
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not nonces.is_valid(nonce, now):
            raise UseDpopNonce("the DPoP proof needs the server's nonce", nonces.current(now))
    if access_token is not None and claims.get("ath") != token_hash(access_token):  # point 11
        raise InvalidDpopProof("the DPoP proof's ath is not the access token's hash")
    return Proof(thumbprint(jwk), jti, issued_at)


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: base64url SHA-256 of the key's required members, sorted, without whitespace."""
    members = _REQUIRED_MEMBERS.get(str(jwk.get("kty")))
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise InvalidDpopProof("the DPoP proof's jwk is not an EC, OKP or RSA public key")
    return jwk_thumbprint({m: jwk[m] for m in members})


def token_hash(access_token: str) -> str:
    """`ath` (§4.2): base64url SHA-256 of the access token's ASCII."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def normalized_uri(uri: str, *, query_allowed: bool = False) -> str:
    """The URI without query and fragment, normalized as RFC 3986 §6.2.2 and §6.2.3 say
    (scheme and host lower case, default port dropped, percent-encodings of unreserved
    characters decoded and the rest upper case, an empty path `/`). A query or fragment is
    refused unless `query_allowed` (the request's own URI), which drops them."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        raise InvalidDpopProof("the DPoP proof's htu is not a URI") from None
    if not query_allowed and (parts.query or parts.fragment or uri.endswith(("?", "#"))):
        raise InvalidDpopProof("the DPoP proof's htu may not hold a query or fragment")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidDpopProof("the DPoP proof's htu is not an absolute http(s) URI")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = _PERCENT.sub(_normal_escape, parts.path) or "/"
    return urlunsplit((scheme, netloc, path, "", ""))


class Nonces:
    """Server nonces (§8, §9) that every worker can issue and check without a round trip: an
    HMAC under a server secret over a time slot. One is current for a slot and the next; a new
    one comes with every slot."""

    def __init__(self, secret: bytes, slot: timedelta = timedelta(minutes=1)) -> None:
        if len(secret) < 16:
            raise ValueError("a nonce secret needs at least 16 bytes")
        self._secret = secret
        self._slot = slot.total_seconds()

    def current(self, now: datetime) -> str:
        return self._nonce(self._slot_of(now))

    def is_valid(self, nonce: str, now: datetime) -> bool:
        slot = self._slot_of(now)
        return any(hmac.compare_digest(nonce, self._nonce(s)) for s in (slot, slot - 1))

    def _slot_of(self, now: datetime) -> int:
        require_aware(now, "now")
        return math.floor(now.timestamp() / self._slot)

    def _nonce(self, slot: int) -> str:
        packed = struct.pack(">q", slot)
        return b64url(packed + hmac.digest(self._secret, packed, "sha256")[:16])


def _parts(proof: str) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """A compact JWS (RFC 7515 §7.1): its header, payload, signing input and signature. Parsed
    once, with the base64url alphabet checked by one regular expression: PyJWT's decoder checks
    it character by character, twice over with its unverified header, which cost more than the
    signature."""
    segments = proof.split(".")
    if len(segments) != 3 or not all(_BASE64URL.fullmatch(s) for s in segments):
        raise InvalidDpopProof(_MALFORMED)
    try:
        header, payload, signature = (
            base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in segments
        )
    except (ValueError, binascii.Error):
        raise InvalidDpopProof(_MALFORMED) from None
    return _json_object(header), payload, f"{segments[0]}.{segments[1]}".encode(), signature


def _json_object(encoded: bytes) -> dict[str, Any]:
    try:
        value = json.loads(encoded)
    except ValueError:  # JSON and UTF-8 errors alike
        raise InvalidDpopProof(_MALFORMED) from None
    if not isinstance(value, dict):
        raise InvalidDpopProof(_MALFORMED)
    return value


@functools.cache
def _algorithm(name: str) -> jwt.algorithms.Algorithm:
    return jwt.get_algorithm_by_name(name)  # builds every algorithm on each call: once here


@functools.lru_cache(maxsize=4096)
def _public_key(jwk: str, algorithm: str) -> Any:
    """The key a JWK (as sorted JSON) stands for: a client presents the same one with every
    proof, so it is parsed once (a key's curve point check is most of the cost)."""
    try:
        return jwt.PyJWK(json.loads(jwk), algorithm).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidDpopProof("the DPoP proof's jwk is not a public key for its alg") from None


def _issued_at(value: object, now: datetime, window: timedelta, skew: timedelta) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidDpopProof("the DPoP proof's iat must be a number")
    try:
        issued_at = datetime.fromtimestamp(value, now.tzinfo)
    except (OverflowError, OSError, ValueError):
        raise InvalidDpopProof("the DPoP proof's iat is out of range") from None
    if issued_at > now + skew:
        raise InvalidDpopProof("the DPoP proof's iat is in the future")
    if issued_at < now - window:
        raise InvalidDpopProof("the DPoP proof's iat is too old")
    return issued_at


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match[0][1:], 16))
    return char if _UNRESERVED.fullmatch(char) else match[0].upper()
