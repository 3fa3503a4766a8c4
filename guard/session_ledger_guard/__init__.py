"""session-ledger-guard: verify session-ledger access tokens locally, in any resource server, and
refuse those of ended sessions within a second, with no call to the session service per request.

    guard = Guard(issuer="https://auth.example.com", audience="api.example.com",
                  client_id="orders-api", client_secret=secret).start()
    claims = guard.verify(token)            # or raises Refused (RFC 6750)
    app = GuardMiddleware(app, guard=guard)  # request.state.claims in every route
"""

from session_ledger_guard._asgi import GuardMiddleware, claims_dependency
from session_ledger_guard._guard import ACCESS_TOKEN_TYPES, Guard, Refused, bearer_token

__all__ = [
    "ACCESS_TOKEN_TYPES",
    "Guard",
    "GuardMiddleware",
    "Refused",
    "bearer_token",
    "claims_dependency",
]
