"""The guard: local verification of session-ledger access tokens, and the session-end feed that
makes a revoked session's tokens refused within a second, with no call per request."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
"""RFC 9068 §4: the `typ` of an access token."""

PROOF_TYPE = "dpop+jwt"
"""RFC 9449 §4.2: the `typ` of a DPoP proof."""
_ASYMMETRIC = frozenset(
    {"ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7638 §3.2: the members of each key type that its thumbprint covers.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The algorithm each key type signs with when its JWK names none (RFC 7518, RFC 8037).
_ALGORITHM_OF = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-256"): "ES256", ("EC", "P-384"): "ES384"}
_FIRST_BACKOFF = 0.25

log = logging.getLogger("session_ledger_guard")


class Refused(Exception):
    """A request the guard refuses, shaped as RFC 6750 §3 (or, for DPoP, RFC 9449 §7.1) says:
    `status_code`, `error`, `description` and the `www_authenticate` challenge (None for
    503)."""

    def __init__(
        self,
        status_code: int,
        error: str,
        description: str,
        *,
        realm: str = "session-ledger",
        scope: str | None = None,
        challenge_error: bool = True,
        scheme: str = "Bearer",
    ) -> None:
        super().__init__(description)
        self.status_code = status_code
        self.error = error
        self.description = description
        self.www_authenticate: str | None = None
        if status_code in (401, 403):
            challenge = f'{scheme} realm="{realm}"'
            if challenge_error:  # §3.1: no error code when the request had no credentials
                challenge += f', error="{error}", error_description="{_quoted(description)}"'
            if scope is not None:
                challenge += f', scope="{scope}"'
            self.www_authenticate = challenge

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}

    def headers(self) -> dict[str, str]:
        headers = {"Cache-Control": "no-store"}
        if self.www_authenticate is not None:
            headers["WWW-Authenticate"] = self.www_authenticate
        return headers


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer` header; Refused (401) without one."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(401, "invalid_request", "a bearer token is required", challenge_error=False)
    return token.strip()


class Guard:
    """Verifies access tokens of one issuer and audience, and refuses those of ended sessions.

    `start()` reads the issuer's RFC 8414 metadata and JWKS, then follows the session-end feed on
    a background thread, authenticating as `client_id`/`client_secret` (a confidential client
    holding the client scope sessions:read). Once the feed has been silent for `max_staleness`
    seconds (it sends a heartbeat every 15 s), every token is refused with 503, unless
    `fail_open`, which accepts them and logs a warning on every request.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        max_staleness: float = 30.0,
        fail_open: bool = False,
        *,
        max_token_lifetime: float = 3600.0,
        leeway: float = 30.0,
        reconnect_at_most: float = 10.0,
        dpop_algorithms: tuple[str, ...] = ("ES256", "EdDSA"),
        dpop_window: float = 60.0,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.max_staleness = max_staleness
        self.fail_open = fail_open
        self._auth = None if client_id is None else (client_id, client_secret or "")
        self._max_token_lifetime = max_token_lifetime
        self._leeway = leeway
        self._reconnect_at_most = reconnect_at_most
        self._http = http or httpx.Client(timeout=10.0)
        self._owns_http = http is None  # a caller's client is the caller's to close
        self._clock = clock  # POSIX seconds: what `exp`, `nbf` and `iat` are checked against
        self._keys: dict[str, tuple[Any, str]] = {}
        self._jwks_read_at = float("-inf")
        self._ended: dict[str, float] = {}  # sid -> when it ended (POSIX seconds)
        self._cursor: str | None = None
        self._last_contact: float | None = None  # time.monotonic() of the feed's last word
        self._connected = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: httpx.Response | None = None
        self._jwks_uri = self._feed_url = ""
        unknown = set(dpop_algorithms) - _ASYMMETRIC
        if unknown:
            raise ValueError(f"DPoP proofs are signed with asymmetric algorithms, not {unknown}")
        self._dpop_algorithms = dpop_algorithms
        self._dpop_window = dpop_window
        # (key thumbprint, jti) of each proof seen, with when it may be forgotten. Per process:
        # several processes of one resource server each accept a proof once (RFC 9449 §11.1
        # leaves the scope of the check to the server).
        self._proofs_seen: dict[tuple[str, str], float] = {}
        self._prune_proofs_at = float("-inf")

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, wait: float = 5.0) -> Guard:
        """Read the metadata and keys, start following the feed, and wait up to `wait` seconds
        for it to answer (tokens are refused with 503 until it has)."""
        metadata = self._get_json(f"{self.issuer}/.well-known/oauth-authorization-server")
        if metadata.get("issuer") != self.issuer:
            raise ValueError(f"the metadata names issuer {metadata.get('issuer')!r}")
        self._jwks_uri = str(metadata["jwks_uri"])
        self._feed_url = str(
            metadata.get("session_ends_endpoint", f"{self.issuer}/feeds/session-ends")
        )
        self._load_keys()
        self._thread = threading.Thread(target=self._follow, name="guard-feed", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + wait
        while not self._connected and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def close(self) -> None:
        """Stop following the feed."""
        self._stopping.set()
        response = self._response
        if response is not None:
            try:
                response.close()
            except Exception:  # the thread may be closing it too
                log.debug("closing the feed's response", exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- verification -------------------------------------------------------------------------

    def verify(self, token: str, *, scope: str | None = None) -> dict[str, Any]:
        """The claims of a bearer token, once its signature (by the key its `kid` names, with
        that key's algorithm only), `typ`, `iss`, `aud`, `exp`, `nbf` and `iat` hold and its
        session has not ended; with `scope`, the token must hold it. A DPoP-bound token (with
        `cnf`) is refused here: it needs its proof (`verify_request`). Else Refused."""
        claims = self._verified(token, scope)
        if "cnf" in claims:  # RFC 9449 §7.2
            raise _invalid_dpop("invalid_token", "a DPoP-bound token needs the DPoP scheme")
        return claims

    def verify_request(
        self,
        authorization: str | None,
        *,
        method: str,
        url: str,
        dpop: str | None = None,
        scope: str | None = None,
    ) -> dict[str, Any]:
        """The claims of a request's access token: `Authorization: Bearer` as `verify` checks
        it, or `Authorization: DPoP` with the request's `DPoP` proof, whose key the token must
        be bound to (RFC 9449 §7.1: `typ`, `alg`, a public `jwk`, the signature, `htm` =
        `method`, `htu` = `url` without query, `iat` within `dpop_window`, `ath`, and each
        proof once in this process). Else Refused."""
        scheme, _, value = (authorization or "").partition(" ")
        token = value.strip()
        if scheme.lower() == "dpop" and token:
            claims = self._verified(token, scope)
            jkt = self._check_proof(dpop, method=method, url=url, token=token)
            confirmation = claims.get("cnf")
            if not isinstance(confirmation, dict) or confirmation.get("jkt") != jkt:
                raise _invalid_dpop("invalid_token", "the token is not bound to the proof's key")
            return claims
        return self.verify(bearer_token(authorization), scope=scope)

    def _verified(self, token: str, scope: str | None) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None
        if header.get("typ") not in ACCESS_TOKEN_TYPES:
            raise _invalid("not an access token (typ)")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _invalid("unknown signing key")
        key, algorithm = self._key(kid)
        if header.get("alg") != algorithm:
            raise _invalid("the algorithm is not the key's")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                # The times are checked below, against the guard's clock.
                options={
                    "require": ["iss", "sub", "aud", "exp", "iat", "client_id"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as e:
            raise _invalid(f"token does not verify: {e}") from None
        self._check_times(claims)
        self._check_feed()
        sid = claims.get("sid")
        if sid is not None and sid in self._ended:
            raise _invalid("the session has ended")
        if scope is not None and scope not in str(claims.get("scope", "")).split():
            raise Refused(403, "insufficient_scope", f"the {scope} scope is required", scope=scope)
        return claims

    def _check_proof(self, proof: str | None, *, method: str, url: str, token: str) -> str:
        """The thumbprint of the key that signed a valid, unseen proof for this request."""
        if not proof or len(proof) > 8192:
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP scheme needs a DPoP proof")
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError:
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof is malformed") from None
        algorithm, jwk = header.get("alg"), header.get("jwk")
        if header.get("typ") != PROOF_TYPE or algorithm not in self._dpop_algorithms:
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof's typ or alg is refused")
        if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & set(jwk):
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof needs a public jwk")
        try:
            key = jwt.PyJWK(jwk, algorithm).key
            claims = jwt.decode(proof, key, algorithms=[algorithm], options={"verify_iat": False})
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof does not verify") from None
        now = self._clock()
        iat, jti = claims.get("iat"), claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof has no jti")
        if claims.get("htm") != method or _uri(claims.get("htu")) != _uri(url, query=True):
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof is for another request")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof has no iat")
        if not now - self._dpop_window <= iat <= now + self._leeway:
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof is too old or too new")
        if claims.get("ath") != _b64(hashlib.sha256(token.encode("ascii")).digest()):
            raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof's ath is not the token's")
        jkt = _thumbprint(jwk)
        with self._lock:
            if now >= self._prune_proofs_at:  # forget the proofs past their window, each second
                self._proofs_seen = {k: t for k, t in self._proofs_seen.items() if t > now}
                self._prune_proofs_at = now + 1.0
            if self._proofs_seen.get((jkt, jti), float("-inf")) > now:
                raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof was presented before")
            self._proofs_seen[(jkt, jti)] = iat + self._dpop_window + self._leeway
        return jkt

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        times = {name: claims.get(name) for name in ("exp", "iat", "nbf")}
        if any(
            value is not None and (isinstance(value, bool) or not isinstance(value, int | float))
            for value in times.values()
        ):
            raise _invalid("malformed time claim")
        if now >= claims["exp"] + self._leeway:
            raise _invalid("token has expired")
        if claims["iat"] > now + self._leeway:
            raise _invalid("token issued in the future")
        if times["nbf"] is not None and claims["nbf"] > now + self._leeway:
            raise _invalid("token not valid yet (nbf)")

    def health(self) -> dict[str, Any]:
        """For health checks: whether the feed is connected, its cursor, seconds since it last
        said anything (None before it first did) and how many ended sessions are held."""
        contact = self._last_contact
        return {
            "connected": self._connected,
            "cursor": self._cursor,
            "lag_seconds": None if contact is None else time.monotonic() - contact,
            "ended_sessions": len(self._ended),
        }

    def _check_feed(self) -> None:
        contact = self._last_contact
        if contact is not None and time.monotonic() - contact <= self.max_staleness:
            return
        if self.fail_open:
            log.warning("the session-end feed is stale; accepting the token (fail_open)")
            return
        raise Refused(
            503, "temporarily_unavailable", "revocations cannot be checked now; retry later"
        )

    # -- keys ---------------------------------------------------------------------------------

    def _key(self, kid: str) -> tuple[Any, str]:
        entry = self._keys.get(kid)
        # An unknown kid may be a new key: read the JWKS again, at most once a second.
        if entry is None and time.monotonic() - self._jwks_read_at >= 1.0:
            self._load_keys()
            entry = self._keys.get(kid)
        if entry is None:
            raise _invalid("unknown signing key")
        return entry

    def _load_keys(self) -> None:
        with self._lock:
            self._jwks_read_at = time.monotonic()
            jwks = self._get_json(self._jwks_uri)
            keys: dict[str, tuple[Any, str]] = {}
            for jwk in jwks.get("keys", []):
                algorithm = jwk.get("alg") or _ALGORITHM_OF.get((jwk.get("kty"), jwk.get("crv")))
                if not isinstance(jwk.get("kid"), str) or algorithm is None:
                    continue  # a key we cannot pin an algorithm to is never used
                keys[jwk["kid"]] = (jwt.PyJWK(jwk, algorithm).key, algorithm)
            self._keys = keys

    def _get_json(self, url: str) -> Mapping[str, Any]:
        response = self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        body: Mapping[str, Any] = response.json()
        return body

    # -- the feed -----------------------------------------------------------------------------

    def _follow(self) -> None:
        backoff = _FIRST_BACKOFF
        while not self._stopping.is_set():
            try:
                self._read_stream()
                backoff = _FIRST_BACKOFF
            except Exception as e:
                if not self._stopping.is_set():
                    log.warning("session-end feed lost (%s); reconnecting in %.2f s", e, backoff)
            self._connected = False
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self._reconnect_at_most)

    def _read_stream(self) -> None:
        headers = {"Accept": "text/event-stream"}
        if self._cursor is not None:
            headers["Last-Event-ID"] = self._cursor
        # A read timeout past the staleness limit: a silent connection is a dead one.
        timeout = httpx.Timeout(10.0, read=max(self.max_staleness, 1.0))
        with self._http.stream(
            "GET", self._feed_url, headers=headers, auth=self._auth, timeout=timeout
        ) as response:
            self._response = response
            if response.status_code != 200:
                raise RuntimeError(f"the feed answered {response.status_code}")
            self._connected = True
            self._last_contact = time.monotonic()
            fields: dict[str, str] = {}
            for line in response.iter_lines():
                if self._stopping.is_set():
                    return
                self._last_contact = time.monotonic()
                if line == "":
                    self._dispatch(fields)
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        raise RuntimeError("the feed closed the stream")

    def _dispatch(self, fields: Mapping[str, str]) -> None:
        if "data" not in fields:
            return
        end = json.loads(fields["data"])
        ended_at = datetime.fromisoformat(str(end["ended_at"]).replace("Z", "+00:00"))
        self._ended[str(end["sid"])] = ended_at.timestamp()
        if "id" in fields:
            self._cursor = fields["id"]
        self._forget_old()

    def _forget_old(self) -> None:
        """Ends older than any token can live are of no more use."""
        oldest = self._clock() - self._max_token_lifetime - self._leeway
        if len(self._ended) % 1000 == 0 or next(iter(self._ended.values())) < oldest:
            self._ended = {sid: at for sid, at in self._ended.items() if at >= oldest}


def _invalid(description: str) -> Refused:
    return Refused(401, "invalid_token", description)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


def _invalid_dpop(error: str, description: str) -> Refused:
    return Refused(401, error, description, scheme="DPoP")


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: base64url SHA-256 of the key's required members, sorted, without whitespace."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")), ())
    if not members or not all(isinstance(jwk.get(m), str) for m in members):
        raise _invalid_dpop("invalid_dpop_proof", "the DPoP proof's jwk is not a public key")
    canonical = json.dumps({m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _uri(value: object, *, query: bool = False) -> str | None:
    """`value` without query and fragment, scheme and host in lower case and the default port
    dropped; None for anything else (a proof's `htu` with a query, unless `query`)."""
    if not isinstance(value, str):
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if not query and (parts.query or parts.fragment or value.endswith(("?", "#"))):
        return None
    host = parts.hostname.lower()
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
