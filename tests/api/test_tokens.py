"""Access tokens resist the known JWT attacks; refresh tokens verify only exactly as issued."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from api.errors import InvalidToken
from api.keys import KeyRing, new_signing_key
from api.tokens import (
    AccessClaims,
    issue_access_token,
    new_session_id,
    parse_refresh_token,
    refresh_token,
    refresh_token_hash,
    verify_access_token,
)

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
EXPIRES = NOW + timedelta(minutes=15)
ISSUER = "https://ledger.example"
AUDIENCE = "https://api.example"
KEY = new_signing_key(NOW)
RING = KeyRing((KEY,))
SECRET = bytes(range(32))
SESSION = "Zm9vYmFyLWJhei1xdXV4"


def _issue(
    ring: KeyRing = RING,
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    scope: tuple[str, ...] = ("read", "write"),
    now: datetime = NOW,
    expires_at: datetime = EXPIRES,
) -> str:
    return issue_access_token(
        ring,
        issuer=issuer,
        audience=audience,
        subject="alice",
        session_id=SESSION,
        client_id="web",
        scope=scope,
        now=now,
        expires_at=expires_at,
    )


def _verify(token: str, now: datetime = NOW, ring: KeyRing = RING) -> AccessClaims:
    return verify_access_token(ring, token, issuer=ISSUER, audience=AUDIENCE, now=now)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64_json(value: Mapping[str, object]) -> str:
    return _b64(json.dumps(value).encode("utf-8"))


def _parts(token: str) -> tuple[dict[str, object], dict[str, object], str]:
    header, payload, signature = token.split(".")
    return _unb64_json(header), _unb64_json(payload), signature


def _unb64_json(part: str) -> dict[str, object]:
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(value, dict)
    return value


def _claims(**overrides: object) -> dict[str, object]:
    _, payload, _ = _parts(_issue())
    payload.update(overrides)
    return payload


def _sign_ed25519(
    private_key: Ed25519PrivateKey, header: Mapping[str, object], payload: Mapping[str, object]
) -> str:
    signing_input = f"{_b64_json(header)}.{_b64_json(payload)}"
    return f"{signing_input}.{_b64(private_key.sign(signing_input.encode('ascii')))}"


def _sign_hs256(secret: bytes, header: Mapping[str, object], payload: Mapping[str, object]) -> str:
    # Built by hand: pyjwt itself refuses to use a PEM public key as an HMAC secret.
    signing_input = f"{_b64_json(header)}.{_b64_json(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _our_header(**overrides: object) -> dict[str, object]:
    header: dict[str, object] = {"alg": "EdDSA", "typ": "at+jwt", "kid": KEY.kid}
    header.update(overrides)
    return {name: value for name, value in header.items() if value is not None}


def _public_raw() -> bytes:
    return KEY.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _public_pem() -> bytes:
    return KEY.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_issue_then_verify_round_trips_every_claim() -> None:
    claims = _verify(_issue())
    assert claims == AccessClaims(
        subject="alice",
        session_id=SESSION,
        client_id="web",
        scope=("read", "write"),
        issued_at=NOW,
        expires_at=EXPIRES,
        jwt_id=claims.jwt_id,
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    assert len(claims.jwt_id) >= 16


def test_the_token_follows_rfc_9068() -> None:
    header, payload, _ = _parts(_issue())
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": KEY.kid}
    assert payload == {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "exp": int(EXPIRES.timestamp()),
        "iat": int(NOW.timestamp()),
        "jti": payload["jti"],
        "client_id": "web",
        "sid": SESSION,
        "scope": "read write",
    }


def test_a_clients_own_token_has_no_sid_and_its_client_as_sub() -> None:
    token = issue_access_token(
        RING, issuer=ISSUER, audience=AUDIENCE, subject="rs", session_id=None, client_id="rs",
        scope=("sessions:read",), now=NOW, expires_at=EXPIRES,
    )  # fmt: skip
    claims = _verify(token)
    assert (claims.subject, claims.client_id, claims.session_id) == ("rs", "rs", None)
    assert "sid" not in jwt.decode(token, options={"verify_signature": False})


def test_every_token_gets_its_own_jti() -> None:
    assert _verify(_issue()).jwt_id != _verify(_issue()).jwt_id


def test_an_empty_scope_round_trips() -> None:
    assert _verify(_issue(scope=())).scope == ()


def test_exp_is_rounded_down_never_past_expires_at() -> None:
    expires_at = EXPIRES + timedelta(microseconds=999_999)
    claims = _verify(_issue(expires_at=expires_at))
    assert claims.expires_at == EXPIRES
    assert claims.expires_at <= expires_at


def test_a_list_audience_containing_ours_is_accepted() -> None:
    token = _sign_ed25519(KEY.private_key, _our_header(), _claims(aud=["other", AUDIENCE]))
    assert _verify(token).audience == AUDIENCE


def test_application_at_jwt_typ_is_accepted() -> None:
    token = _sign_ed25519(KEY.private_key, _our_header(typ="application/AT+JWT"), _claims())
    assert _verify(token).subject == "alice"


def test_a_bound_token_carries_its_keys_thumbprint_as_cnf() -> None:
    token = issue_access_token(
        RING,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        session_id=SESSION,
        client_id="web",
        scope=(),
        now=NOW,
        expires_at=EXPIRES,
        jkt="the-keys-thumbprint",
    )
    assert _parts(token)[1]["cnf"] == {"jkt": "the-keys-thumbprint"}
    assert _verify(token).jkt == "the-keys-thumbprint"
    assert _verify(_issue()).jkt is None


def test_a_token_signed_by_a_retired_key_still_verifies() -> None:
    token = _issue()
    retired = replace(KEY, retired_at=NOW)
    newer = new_signing_key(NOW + timedelta(seconds=1))
    assert _verify(token, ring=KeyRing((retired, newer))).subject == "alice"


def test_tokens_are_signed_with_the_current_key() -> None:
    retired = replace(KEY, retired_at=NOW)
    newer = new_signing_key(NOW + timedelta(seconds=1))
    header, _, _ = _parts(_issue(KeyRing((retired, newer))))
    assert header["kid"] == newer.kid


@pytest.mark.parametrize(
    ("issue", "message"),
    [
        (lambda: _issue(expires_at=NOW), "expire after"),
        (
            lambda: _issue(now=NOW.replace(tzinfo=None), expires_at=EXPIRES.replace(tzinfo=None)),
            "aware",
        ),
        (lambda: _issue(scope=("read write",)), "scope"),
        (lambda: _issue(scope=("",)), "scope"),
        (lambda: _issue(scope=('say"hi"',)), "scope"),
    ],
)
def test_issue_refuses_bad_arguments(issue: Callable[[], str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        issue()


def test_verify_refuses_a_naive_now() -> None:
    with pytest.raises(ValueError, match="aware"):
        _verify(_issue(), now=NOW.replace(tzinfo=None))


def _alg_none() -> str:
    return f"{_b64_json(_our_header(alg='none'))}.{_b64_json(_claims())}."


def _alg_none_capitalised() -> str:
    return f"{_b64_json(_our_header(alg='None'))}.{_b64_json(_claims())}."


def _hs256_with_raw_public_key() -> str:
    return _sign_hs256(_public_raw(), _our_header(alg="HS256"), _claims())


def _hs256_with_pem_public_key() -> str:
    return _sign_hs256(_public_pem(), _our_header(alg="HS256"), _claims())


def _rs256() -> str:
    return _sign_hs256(_public_pem(), _our_header(alg="RS256"), _claims())


def _unknown_kid() -> str:
    return _sign_ed25519(KEY.private_key, _our_header(kid="no-such-key"), _claims())


def _no_kid() -> str:
    return jwt.encode(_claims(), KEY.private_key, algorithm="EdDSA", headers={"typ": "at+jwt"})


def _non_string_kid() -> str:
    return _sign_ed25519(KEY.private_key, _our_header(kid=["x"]), _claims())


def _tampered_subject() -> str:
    header, _, signature = _issue().split(".")
    return f"{header}.{_b64_json(_claims(sub='mallory'))}.{signature}"


def _stripped_signature() -> str:
    header, payload, _ = _issue().split(".")
    return f"{header}.{payload}."


def _other_key_claiming_our_kid() -> str:
    return _sign_ed25519(Ed25519PrivateKey.generate(), _our_header(), _claims())


def _expired_at_exp() -> str:
    return _issue(now=NOW - timedelta(minutes=15), expires_at=NOW)


def _expired_before() -> str:
    return _issue(now=NOW - timedelta(minutes=16), expires_at=NOW - timedelta(seconds=1))


def _wrong_audience() -> str:
    return _issue(audience="https://elsewhere.example")


def _list_audience_without_ours() -> str:
    return _sign_ed25519(KEY.private_key, _our_header(), _claims(aud=["other"]))


def _wrong_issuer() -> str:
    return _issue(issuer="https://evil.example")


def _typ_jwt() -> str:
    return _sign_ed25519(KEY.private_key, _our_header(typ="JWT"), _claims())


def _typ_missing() -> str:
    header = {"alg": "EdDSA", "kid": KEY.kid}
    return _sign_ed25519(KEY.private_key, header, _claims())


def _missing(name: str) -> Callable[[], str]:
    def build() -> str:
        claims = _claims()
        del claims[name]
        return _sign_ed25519(KEY.private_key, _our_header(), claims)

    return build


def _at(moment: datetime) -> int:
    return int(moment.timestamp())


def test_iat_and_nbf_within_the_clock_skew_are_accepted() -> None:
    nearly = _at(NOW + timedelta(seconds=30))
    claims = _verify(_signed_claims(iat=nearly, nbf=nearly)())
    assert claims.issued_at == NOW + timedelta(seconds=30)
    assert _verify(_signed_claims(nbf=_at(NOW - timedelta(minutes=1)))()).subject


def _signed_claims(**overrides: object) -> Callable[[], str]:
    return lambda: _sign_ed25519(KEY.private_key, _our_header(), _claims(**overrides))


ATTACKS: dict[str, tuple[Callable[[], str], str]] = {
    "alg none": (_alg_none, "signature does not verify"),
    "alg None": (_alg_none_capitalised, "signature does not verify"),
    "HS256, raw public key": (_hs256_with_raw_public_key, "signature does not verify"),
    "HS256, PEM public key": (_hs256_with_pem_public_key, "signature does not verify"),
    "RS256 header": (_rs256, "signature does not verify"),
    "unknown kid": (_unknown_kid, "unknown signing key"),
    "no kid": (_no_kid, "unknown signing key"),
    "non-string kid": (_non_string_kid, "malformed token"),
    "tampered sub": (_tampered_subject, "signature does not verify"),
    "stripped signature": (_stripped_signature, "signature does not verify"),
    "other key, our kid": (_other_key_claiming_our_kid, "signature does not verify"),
    "now == exp": (_expired_at_exp, "token has expired"),
    "now > exp": (_expired_before, "token has expired"),
    "wrong aud": (_wrong_audience, "wrong audience"),
    "aud list without ours": (_list_audience_without_ours, "wrong audience"),
    "wrong iss": (_wrong_issuer, "wrong issuer"),
    "typ JWT": (_typ_jwt, "not an access token (typ)"),
    "typ missing": (_typ_missing, "not an access token (typ)"),
    **{
        f"no {name}": (_missing(name), f"missing claim {name}")
        for name in ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")
    },
    # Only a client's own token has no sid, and its sub is its client id.
    "a user's token without sid": (_missing("sid"), "a token without a session is its client's"),
    "sid as a number": (_signed_claims(sid=7), "malformed claim sid"),
    "cnf as a string": (_signed_claims(cnf="key"), "malformed cnf claim"),
    "cnf without jkt": (_signed_claims(cnf={"x5t#S256": "x"}), "malformed cnf claim"),
    "cnf.jkt empty": (_signed_claims(cnf={"jkt": ""}), "malformed cnf claim"),
    "exp as a string": (_signed_claims(exp="9999999999"), "malformed claim exp"),
    "exp as true": (_signed_claims(exp=True), "malformed claim exp"),
    "exp beyond year 6000": (_signed_claims(exp=2**62), "malformed claim exp"),
    "iat as a float": (_signed_claims(iat=1.5), "malformed claim iat"),
    "sub as a number": (_signed_claims(sub=7), "malformed claim sub"),
    "scope as a list": (_signed_claims(scope=["read"]), "malformed claim scope"),
    # Hardening finding 9: nbf and a future iat were ignored.
    "iat an hour ahead": (_signed_claims(iat=_at(NOW + timedelta(hours=1))), "in the future"),
    "iat 31 s ahead": (_signed_claims(iat=_at(NOW + timedelta(seconds=31))), "in the future"),
    "nbf an hour ahead": (_signed_claims(nbf=_at(NOW + timedelta(hours=1))), "not valid yet"),
    "nbf as a string": (_signed_claims(nbf="0"), "malformed claim nbf"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_verify_rejects(attack: str) -> None:
    build, reason = ATTACKS[attack]
    with pytest.raises(InvalidToken) as caught:
        _verify(build())
    assert reason in caught.value.description


@pytest.mark.parametrize(
    "garbage",
    ["", "a.b", "a.b.c", "a.b.c.d", "...", "é.ü.ß", "\x00", "eyJ.eyJ.", "ä" * 10, "a" * 100_000],
)
def test_verify_rejects_garbage_as_malformed(garbage: str) -> None:
    with pytest.raises(InvalidToken, match="malformed token"):
        _verify(garbage)


def test_verify_rejects_a_header_that_is_not_an_object() -> None:
    token = f"{_b64(b'[1]')}.{_b64_json(_claims())}.sig"
    with pytest.raises(InvalidToken, match="malformed token"):
        _verify(token)


def test_verify_rejects_a_payload_that_is_not_an_object() -> None:
    signing_input = f"{_b64_json(_our_header())}.{_b64(b'[1]')}"
    token = f"{signing_input}.{_b64(KEY.private_key.sign(signing_input.encode('ascii')))}"
    with pytest.raises(InvalidToken, match="malformed token"):
        _verify(token)


@given(st.text(max_size=300))
def test_verify_raises_only_invalid_token_for_any_text(text: str) -> None:
    with pytest.raises(InvalidToken):
        _verify(text)


VALID = _issue()


@given(st.integers(0, len(VALID) - 1), st.characters(codec="utf-8"))
def test_a_changed_character_never_yields_other_claims(index: int, char: str) -> None:
    # base64url ignores the spare low bits of a final character, so a few changes decode to the
    # very same bytes and still verify; those must then carry exactly the original claims.
    changed = VALID[:index] + char + VALID[index + 1 :]
    try:
        claims = _verify(changed)
    except InvalidToken:
        return
    assert claims == _verify(VALID)


def test_invalid_token_keeps_its_reason() -> None:
    error = InvalidToken("token has expired")
    assert error.description == "token has expired"
    assert str(error) == "token has expired"


# Refresh tokens.


def test_refresh_token_round_trips() -> None:
    token = refresh_token(SECRET, SESSION, 7)
    assert parse_refresh_token(SECRET, token) == (SESSION, 7)


def test_refresh_token_is_deterministic_for_a_retried_refresh() -> None:
    assert refresh_token(SECRET, SESSION, 3) == refresh_token(SECRET, SESSION, 3)
    assert refresh_token(SECRET, SESSION, 3) != refresh_token(SECRET, SESSION, 4)


def test_refresh_token_mac_has_256_bits() -> None:
    mac = refresh_token(SECRET, SESSION, 1).split(".")[2]
    assert len(base64.urlsafe_b64decode(mac + "=")) == 32


def test_refresh_token_with_a_new_session_id_round_trips() -> None:
    session_id = new_session_id()
    assert len(base64.urlsafe_b64decode(session_id + "==")) == 16
    token = refresh_token(SECRET, session_id, 999_999_999)
    assert parse_refresh_token(SECRET, token) == (session_id, 999_999_999)


def test_a_refresh_token_under_another_secret_does_not_verify() -> None:
    token = refresh_token(SECRET, SESSION, 1)
    with pytest.raises(InvalidToken, match="refresh token does not verify"):
        parse_refresh_token(bytes(32), token)


def test_a_mac_moved_to_another_generation_does_not_verify() -> None:
    mac = refresh_token(SECRET, SESSION, 1).split(".")[2]
    with pytest.raises(InvalidToken, match="refresh token does not verify"):
        parse_refresh_token(SECRET, f"{SESSION}.2.{mac}")


FULLWIDTH_ONE = "\uff11"  # a digit to str.isdigit and int(), not to the token format


def _mac(session_id: str, generation: str) -> str:
    message = f"refresh:{session_id}:{generation}".encode()
    return _b64(hmac.new(SECRET, message, hashlib.sha256).digest())


@pytest.mark.parametrize(
    "token",
    [
        "",
        f"{SESSION}.1",
        f"{SESSION}..{_mac(SESSION, '1')}",
        f".1.{_mac('', '1')}",
        f"{SESSION}.01.{_mac(SESSION, '01')}",
        f"{SESSION}.0.{_mac(SESSION, '0')}",
        f"{SESSION}.-1.{_mac(SESSION, '-1')}",
        f"{SESSION}.+1.{_mac(SESSION, '+1')}",
        f"{SESSION}.1000000000.{_mac(SESSION, '1000000000')}",
        f"{SESSION}.1.{_mac(SESSION, '1')}.x",
        f"{SESSION}.1.{_mac(SESSION, '1')}=",
        f"{SESSION}.1.{_mac(SESSION, '1')}\n",
        f"{SESSION}.{FULLWIDTH_ONE}.{_mac(SESSION, FULLWIDTH_ONE)}",
        f"{'a' * 65}.1.{_mac('a' * 65, '1')}",
        f"a+b.1.{_mac('a+b', '1')}",
        f"{SESSION}.1.{_mac(SESSION, '1')[:-1]}",
        "x" * 201,
        "é.1.x",
    ],
)
def test_malformed_refresh_tokens_are_rejected(token: str) -> None:
    with pytest.raises(InvalidToken, match="malformed refresh token"):
        parse_refresh_token(SECRET, token)


@pytest.mark.parametrize(
    ("session_id", "generation"),
    [("", 1), ("a.b", 1), ("a" * 65, 1), (SESSION, 0), (SESSION, -1), (SESSION, 10**9)],
)
def test_refresh_token_refuses_what_it_could_not_parse(session_id: str, generation: int) -> None:
    with pytest.raises(ValueError, match=r"session id|generation"):
        refresh_token(SECRET, session_id, generation)


def test_refresh_token_refuses_a_short_secret() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        refresh_token(b"short", SESSION, 1)


session_ids = st.from_regex(re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII), fullmatch=True)
generations = st.integers(1, 999_999_999)


@given(session_ids, generations, st.data())
def test_any_single_character_change_is_rejected(
    session_id: str, generation: int, data: st.DataObject
) -> None:
    token = refresh_token(SECRET, session_id, generation)
    index = data.draw(st.integers(0, len(token)))
    char = data.draw(st.characters(codec="utf-8") | st.sampled_from("0Aa_-.="))
    edit = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    changed = {
        "replace": token[:index] + char + token[index + 1 :],
        "insert": token[:index] + char + token[index:],
        "delete": token[:index] + token[index + 1 :],
    }[edit]
    if changed == token:
        assert parse_refresh_token(SECRET, changed) == (session_id, generation)
        return
    with pytest.raises(InvalidToken):
        parse_refresh_token(SECRET, changed)


TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "


def test_every_substitution_from_the_token_alphabet_is_rejected() -> None:
    # Exhaustive where hypothesis samples: every position, every character a token could hold.
    token = refresh_token(SECRET, SESSION, 12)
    accepted = []
    for index, original in enumerate(token):
        for char in TOKEN_ALPHABET.replace(original, ""):
            changed = token[:index] + char + token[index + 1 :]
            with contextlib.suppress(InvalidToken):
                accepted.append(parse_refresh_token(SECRET, changed))
    assert accepted == []


def test_refresh_token_hash_is_hex_sha256_and_not_the_token() -> None:
    token = refresh_token(SECRET, SESSION, 1)
    digest = refresh_token_hash(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != token
    assert token not in digest
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert digest != refresh_token_hash(refresh_token(SECRET, SESSION, 2))
