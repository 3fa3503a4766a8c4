"""DPoP (RFC 9449) at the HTTP edge: the proof a request carries in its `DPoP` header, checked by
api.dpop and taken once across every worker (api.dpop_replay), and the access token of a
request's `Authorization` header, `Bearer` or `DPoP`. A refresh takes its proof in its own
transaction (SessionService.refresh); every other request here."""

from __future__ import annotations

from fastapi import Request

from api.accounts import Client
from api.dpop import DEFAULT_SKEW, Nonces, Proof, check_proof
from api.dpop_replay import REPLAYED, ProofReplay
from api.errors import InvalidDpopProof
from api.http.errors import ResourceProofRefused
from api.settings import Settings


async def request_proof(
    request: Request, access_token: str | None = None, nonces: Nonces | None = None
) -> Proof | None:
    """The request's DPoP proof, if it has one, checked (`checked_proof`) and taken once; else
    InvalidDpopProof."""
    proof = checked_proof(request, access_token, nonces)
    await taken_once(request, proof)
    return proof


def checked_proof(
    request: Request, access_token: str | None = None, nonces: Nonces | None = None
) -> Proof | None:
    """The request's DPoP proof, if it has one; InvalidDpopProof when it fails a check of §4.3.
    With `access_token` (a resource request) its `ath` must match; with `nonces`, its nonce must
    be current (UseDpopNonce otherwise). Its jti is not taken yet: see `taken_once`."""
    values = request.headers.getlist("dpop")
    if not values:
        return None
    if len(values) > 1:  # §4.3 point 1
        raise InvalidDpopProof("a request carries at most one DPoP header")
    settings: Settings = request.app.state.settings
    return check_proof(
        values[0],
        method=request.method,
        uri=settings.issuer.rstrip("/") + request.url.path,
        now=request.app.state.service.clock(),
        algorithms=settings.dpop_algorithms,
        window=settings.dpop_window,
        skew=DEFAULT_SKEW,
        access_token=access_token,
        nonces=nonces,
    )


async def taken_once(request: Request, proof: Proof | None) -> None:
    """Take the proof's jti across every worker (§11.1); InvalidDpopProof when it was taken."""
    replay: ProofReplay = request.app.state.service.proof_replay
    if proof is not None and not await replay.first_use(proof):
        raise InvalidDpopProof(REPLAYED)


def token_request_proof(request: Request, client: Client) -> Proof | None:
    """The checked proof of a request that issues tokens (/oauth/token, /browser/login and
    refresh), with the server's nonce when nonces are on; a client registered with
    --require-dpop must send one (RFC 9449 §5.2, dpop_bound_access_tokens). Not yet taken: the
    caller takes it, with `taken_once` or within SessionService.refresh."""
    proof = checked_proof(request, nonces=request.app.state.dpop_nonces)
    if proof is None and client.dpop_bound:
        raise InvalidDpopProof("this client must send a DPoP proof with every token request")
    return proof


async def proven_key(request: Request, client: Client) -> str | None:
    """The thumbprint of the key a token request proves (its proof checked as
    `token_request_proof` does, and taken once), or None without a proof."""
    proof = token_request_proof(request, client)
    await taken_once(request, proof)
    return None if proof is None else proof.jkt


def nonced(request: Request, headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the DPoP nonce to use next when server nonces are on (RFC 9449 §8.2)."""
    nonces: Nonces | None = request.app.state.dpop_nonces
    if nonces is None:
        return headers
    return {**headers, "DPoP-Nonce": nonces.current(request.app.state.service.clock())}


async def access_token(request: Request) -> tuple[str, str | None] | None:
    """The request's access token with, for `Authorization: DPoP`, its proof's key thumbprint
    (RFC 9449 §7.1); None without one. A proof that fails is a 401 with a DPoP challenge."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    token = value.strip()
    if not token:
        return None
    if scheme.lower() == "bearer":
        return token, None
    if scheme.lower() != "dpop":
        return None
    try:
        proof = await request_proof(request, access_token=token)
    except InvalidDpopProof as refused:
        raise ResourceProofRefused(refused.description) from None
    if proof is None:
        raise ResourceProofRefused("the DPoP scheme needs a DPoP proof header")
    return token, proof.jkt
