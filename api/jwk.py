"""JSON Web Key helpers that need no key store: unpadded base64url and the RFC 7638
thumbprint."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping


def b64url(raw: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def jwk_thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638: base64url SHA-256 of a key's required members, sorted, without whitespace."""
    canonical = json.dumps(dict(members), sort_keys=True, separators=(",", ":")).encode()
    return b64url(hashlib.sha256(canonical).digest())
