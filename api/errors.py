"""The application core's refusals: what a caller did wrong or may not do, and why.

Nothing here knows HTTP. The HTTP edge maps each class to a status, an RFC 6749 / 6750 error code
and headers in one table (`api/http/errors.py`).
"""

from __future__ import annotations

from datetime import timedelta


class Refusal(Exception):
    """Base of the core's refusals; `description` is safe to show to the caller."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class InvalidRequest(Refusal):
    """A parameter is missing, repeated, malformed or too large."""


class InvalidClient(Refusal):
    """The client is unknown, or its authentication failed."""


class UnauthorizedClient(Refusal):
    """The client may not use this grant type."""


class UnsupportedGrantType(Refusal):
    """The grant type is not one this server issues tokens for."""


class InvalidGrant(Refusal):
    """Bad credentials, or a refresh token that is unknown, rotated, expired or revoked."""


class InvalidScope(Refusal):
    """The requested scope is unknown or beyond what the user holds."""


class TooManyAttempts(Refusal):
    """Too many attempts from one address; `retry_after` says when the next one is admitted."""

    def __init__(self, description: str, retry_after: timedelta) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class InvalidToken(Refusal):
    """An access or refresh token that does not verify, or whose session is no longer active.

    SECURITY: token checks raise this and nothing else, whatever the cause, so that a malformed
    token can never take another path than a refused one.
    """


class InvalidDpopProof(Refusal):
    """A DPoP proof (RFC 9449) that is malformed, or fails one of its checks."""


class UseDpopNonce(InvalidDpopProof):
    """The proof lacks the server's current nonce (RFC 9449 §8): `nonce` is the one to use."""

    def __init__(self, description: str, nonce: str) -> None:
        super().__init__(description)
        self.nonce = nonce


class DpopBindingRefused(InvalidToken):
    """An access token used against its DPoP binding (RFC 9449 §7): a bound one with the Bearer
    scheme or another key's proof, or an unbound one with the DPoP scheme."""


class InsufficientScope(Refusal):
    """The access token is valid but lacks a scope the call needs."""


class NotFound(Refusal):
    """The resource does not exist, or is not the caller's."""
