"""An authorization code's life (RFC 6749 §4.1, PKCE RFC 7636) as a pure fold over its events,
and the rules of its redemption."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ledger.events import AuthorizationCodeIssued, AuthorizationCodeRedeemed
from ledger.records import RecordedEvent

_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
"""RFC 7636 §4.1: code_verifier = 43*128unreserved."""
CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
"""What an S256 code_challenge is: the base64url of a SHA-256, unpadded (RFC 7636 §4.2)."""


@dataclass(frozen=True)
class CodeState:
    issued: AuthorizationCodeIssued
    version: int
    redeemed: AuthorizationCodeRedeemed | None = None
    redeemed_at: datetime | None = None


def fold(events: Sequence[RecordedEvent]) -> CodeState | None:
    """The code's state after its stream's events; None for a code never issued."""
    state: CodeState | None = None
    for recorded in events:
        event = recorded.event
        if isinstance(event, AuthorizationCodeIssued):
            state = CodeState(event, recorded.version)
        elif state is not None:
            redeemed = isinstance(event, AuthorizationCodeRedeemed)
            state = CodeState(
                state.issued,
                recorded.version,
                event if redeemed else state.redeemed,  # type: ignore[arg-type]
                recorded.occurred_at if redeemed else state.redeemed_at,
            )
    return state


def s256(verifier: str) -> str:
    """The S256 code challenge of a verifier (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def refusal(
    state: CodeState, client_id: str, redirect_uri: str, verifier: str, now: datetime
) -> str | None:
    """Why the (not yet redeemed) code may not be redeemed so, or None (RFC 6749 §4.1.3,
    RFC 7636 §4.6): `expired`, `client`, `redirect_uri` or `verifier`."""
    issued = state.issued
    if now >= issued.expires_at:
        return "expired"
    if client_id != issued.client_id:
        return "client"
    if redirect_uri != issued.redirect_uri:
        return "redirect_uri"
    if not _VERIFIER.fullmatch(verifier) or s256(verifier) != issued.code_challenge:
        return "verifier"
    return None


def code_hash(code: str) -> str:
    """The SHA-256 (hex) a code's stream is named by; the code itself is stored nowhere."""
    return hashlib.sha256(code.encode()).hexdigest()
