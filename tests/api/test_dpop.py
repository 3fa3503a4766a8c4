"""DPoP proof checks (RFC 9449 §4.3), one test per rule, hypothesis over malformed proofs, the
RFC 7638 thumbprint and server nonces."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from api.dpop import Nonces, Proof, check_proof, normalized_uri, thumbprint, token_hash
from api.errors import InvalidDpopProof, UseDpopNonce

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
URI = "https://ledger.test/oauth/token"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
ACCESS_TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZGEifQ.c2ln"


def _jwk_json(key: Any) -> str:
    algorithm = jwt.get_algorithm_by_name(
        "EdDSA" if isinstance(key, Ed25519PrivateKey) else "ES256"
    )
    return str(algorithm.to_jwk(key.public_key()))


def proof(
    key: Any = EC_KEY,
    *,
    alg: str | None = None,
    header: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A proof for POST URI at NOW, signed by `key`, with `claims` replaced and `drop` left out."""
    alg = alg or ("EdDSA" if isinstance(key, Ed25519PrivateKey) else "ES256")
    body = {"jti": "e1j3V_bKic8-LAEB", "htm": "POST", "htu": URI, "iat": int(NOW.timestamp())}
    body.update(claims)
    for name in drop:
        body.pop(name)
    fields = {"typ": "dpop+jwt", "jwk": json.loads(_jwk_json(key)), **(header or {})}
    return jwt.encode(body, key, algorithm=alg, headers=fields)


def check(token: str, **options: Any) -> Proof:
    return check_proof(token, **{"method": "POST", "uri": URI, "now": NOW, **options})


def refused(token: str, says: str, **options: Any) -> None:
    with pytest.raises(InvalidDpopProof) as caught:
        check(token, **options)
    assert says in caught.value.description


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_a_good_proof_gives_its_keys_thumbprint_and_its_jti(key: Any) -> None:
    checked = check(proof(key))
    assert checked.jkt == thumbprint(json.loads(_jwk_json(key)))
    assert (checked.jti, checked.issued_at) == ("e1j3V_bKic8-LAEB", NOW)


def test_a_token_that_is_not_a_jwt_is_refused() -> None:
    refused("not.a.jwt", "well-formed")
    refused("%%%.###.!!!", "well-formed")


def test_the_typ_must_be_dpop_jwt() -> None:
    refused(proof(header={"typ": "JWT"}), "typ must be dpop+jwt")


def test_a_symmetric_alg_is_refused_even_when_configured() -> None:
    token = jwt.encode(
        {"jti": "x", "htm": "POST", "htu": URI, "iat": int(NOW.timestamp())},
        "a-shared-secret-of-enough-bytes-0123456789",
        algorithm="HS256",
        headers={"typ": "dpop+jwt", "jwk": {"kty": "oct"}},
    )
    refused(token, "alg must be one of", algorithms=("ES256", "HS256"))


def test_an_alg_outside_the_configured_list_is_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(rsa_key.public_key()))
    token = jwt.encode(
        {"jti": "x", "htm": "POST", "htu": URI, "iat": int(NOW.timestamp())},
        rsa_key,
        algorithm="RS256",
        headers={"typ": "dpop+jwt", "jwk": jwk},
    )
    refused(token, "alg must be one of ES256, EdDSA")
    assert check(token, algorithms=("RS256",)).jti == "x"


def test_the_alg_none_is_refused() -> None:
    unsigned = jwt.encode(
        {"jti": "x", "htm": "POST", "htu": URI, "iat": int(NOW.timestamp())},
        "",
        algorithm="none",
        headers={"typ": "dpop+jwt", "jwk": json.loads(_jwk_json(EC_KEY))},
    )
    refused(unsigned, "alg must be one of")


def test_a_proof_without_a_jwk_is_refused() -> None:
    token = proof()
    header, rest = token.split(".", 1)
    fields = json.loads(base64.urlsafe_b64decode(header + "=="))
    del fields["jwk"]
    stripped = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    refused(f"{stripped}.{rest}", "no jwk")


def test_a_private_key_in_the_jwk_is_refused() -> None:
    private = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(EC_KEY))
    assert "d" in private
    refused(proof(header={"jwk": private}), "private key material")


def test_a_jwk_of_another_type_than_the_alg_is_refused() -> None:
    refused(proof(header={"jwk": json.loads(_jwk_json(ED_KEY))}), "not a public key for its alg")


def test_a_signature_by_another_key_is_refused() -> None:
    refused(proof(OTHER_KEY, header={"jwk": json.loads(_jwk_json(EC_KEY))}), "signature")


@pytest.mark.parametrize("claim", ["jti", "htm", "htu", "iat"])
def test_a_missing_claim_is_refused(claim: str) -> None:
    refused(proof(drop=(claim,)), f"no {claim} claim")


def test_an_empty_or_huge_jti_is_refused() -> None:
    refused(proof(jti=""), "jti")
    refused(proof(jti="j" * 300), "jti")


def test_the_htm_must_be_the_requests_method() -> None:
    refused(proof(htm="GET"), "htm")


@pytest.mark.parametrize(
    "htu",
    [
        "https://elsewhere.test/oauth/token",
        "https://ledger.test/oauth/revoke",
        "http://ledger.test/oauth/token",
    ],
)
def test_the_htu_must_be_the_requests_uri(htu: str) -> None:
    refused(proof(htu=htu), "htu is not this request's URI")


@pytest.mark.parametrize("htu", [f"{URI}?a=1", f"{URI}#f", f"{URI}?"])
def test_an_htu_with_a_query_or_fragment_is_refused(htu: str) -> None:
    refused(proof(htu=htu), "query or fragment")


def test_the_htu_is_compared_after_normalization_and_the_requests_query_is_ignored() -> None:
    assert check(proof(htu="HTTPS://Ledger.TEST:443/oauth/%74oken"), uri=f"{URI}?x=1").jti


def test_an_iat_in_the_future_is_refused_past_the_skew() -> None:
    assert check(proof(iat=int(NOW.timestamp()) + 5)).jti
    refused(proof(iat=int(NOW.timestamp()) + 6), "in the future")


def test_an_iat_older_than_the_window_is_refused() -> None:
    assert check(proof(iat=int(NOW.timestamp()) - 60)).jti
    refused(proof(iat=int(NOW.timestamp()) - 61), "too old")
    assert check(proof(iat=int(NOW.timestamp()) - 100), window=timedelta(minutes=2)).jti


@pytest.mark.parametrize("iat", ["now", True, 1e300, None])
def test_an_iat_that_is_no_time_is_refused(iat: Any) -> None:
    with pytest.raises(InvalidDpopProof):
        check(proof(iat=iat))


def test_a_resource_request_needs_the_access_tokens_hash() -> None:
    assert check(proof(ath=token_hash(ACCESS_TOKEN)), access_token=ACCESS_TOKEN).jti
    refused(proof(), "ath", access_token=ACCESS_TOKEN)
    refused(proof(ath=token_hash("another token")), "ath", access_token=ACCESS_TOKEN)


def test_a_nonce_is_required_when_the_server_asks_for_one() -> None:
    nonces = Nonces(b"n" * 32)
    current = nonces.current(NOW)
    assert check(proof(nonce=current), nonces=nonces).jti
    for token in (proof(), proof(nonce="made-up")):
        with pytest.raises(UseDpopNonce) as caught:
            check(token, nonces=nonces)
        assert caught.value.nonce == current


def test_a_nonce_lasts_its_slot_and_the_next_then_expires() -> None:
    nonces = Nonces(b"n" * 32)
    nonce = nonces.current(NOW)
    assert nonces.is_valid(nonce, NOW + timedelta(seconds=90))
    assert not nonces.is_valid(nonce, NOW + timedelta(minutes=2))
    assert nonces.current(NOW + timedelta(minutes=1)) != nonce
    assert not Nonces(b"m" * 32).is_valid(nonce, NOW)


def test_an_overlong_proof_is_refused_before_parsing() -> None:
    refused("a" * 9000, "too long")


def test_the_thumbprint_is_rfc_7638s() -> None:
    # RFC 7638 §3.1's example key and its thumbprint.
    key = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
            "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
            "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
            "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_normalization_keeps_what_differs() -> None:
    assert normalized_uri("https://a.test:8443/x") == "https://a.test:8443/x"
    assert normalized_uri("https://a.test") == "https://a.test/"
    assert normalized_uri("https://a.test/%2f") == "https://a.test/%2F"
    with pytest.raises(InvalidDpopProof):
        normalized_uri("ledger.test/oauth/token")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(text=st.text(max_size=200))
def test_any_text_is_refused_cleanly(text: str) -> None:
    with pytest.raises(InvalidDpopProof):
        check(text)


@given(
    segments=st.lists(
        st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
        min_size=1,
        max_size=4,
    )
)
def test_any_base64_segments_are_refused_cleanly(segments: list[str]) -> None:
    with pytest.raises(InvalidDpopProof):
        check(".".join(segments))


@given(
    header=st.dictionaries(
        st.sampled_from(["typ", "alg", "jwk", "kid", "crit"]), _JSON, max_size=4
    ),
    claims=st.dictionaries(
        st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce", "exp"]), _JSON, max_size=7
    ),
)
def test_signed_proofs_with_arbitrary_members_pass_or_are_refused_cleanly(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    fields = {"typ": "dpop+jwt", "jwk": json.loads(_jwk_json(EC_KEY)), **header}
    fields.pop("alg", None)
    try:
        token = jwt.encode(claims, EC_KEY, algorithm="ES256", headers=fields)
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # not even encodable as a JWT
    try:
        checked = check(token)
    except InvalidDpopProof:
        return
    assert checked.jti == claims["jti"]  # it passed: so every rule held
    assert claims["htm"] == "POST"
