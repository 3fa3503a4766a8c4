"""OpenAPI 3 links: which value of a response a later request takes.

Client generators read them; the stateful fuzzer (tests/reliability/test_fuzz.py) follows them, so
each one must work. api/openapi.py attaches them to the 200 responses they start from.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

ISSUED_BEARER: Schema = {"Authorization": "Bearer {$response.body#/access_token}"}
_SAME_BEARER: Schema = {"Authorization": "$request.header.Authorization"}
_SAME_CLIENT = "$request.body#/client_id"
_FIRST_SESSION: Schema = {"session_id": "$response.body#/sessions/0/id", **_SAME_BEARER}


def _link(
    method: str, path: str, description: str, parameters: Schema | None = None, **extra: Any
) -> Schema:
    # operationRef names the route by method and path, which the decorators state; FastAPI
    # derives operationIds from function names, which nothing here should depend on.
    pointer = path.replace("~", "~0").replace("/", "~1")
    link = {"operationRef": f"#/paths/{pointer}/{method}", "description": description, **extra}
    return {**link, "parameters": parameters} if parameters else link


def bearer_links(parameters: Schema) -> Schema:
    return {
        "ListSessions": _link("get", "/sessions", "the user's sessions", parameters),
        "RecordActivity": _link("post", "/sessions/current/activity", "keep it alive", parameters),
        "EndAllSessions": _link("delete", "/sessions", "log out everywhere", parameters),
    }


TOKEN_LINKS: Schema = {
    "RefreshToken": _link(
        "post",
        "/oauth/token",
        "rotate the refresh token, as the client it was issued to",
        requestBody={
            "grant_type": "refresh_token",
            "refresh_token": "$response.body#/refresh_token",
            "client_id": _SAME_CLIENT,
        },
    ),
    "RevokeRefreshToken": _link(
        "post",
        "/oauth/revoke",
        "end the session (RFC 7009), as the client the token was issued to",
        requestBody={
            "token": "$response.body#/refresh_token",
            "token_type_hint": "refresh_token",
            "client_id": _SAME_CLIENT,
        },
    ),
    "IntrospectAccessToken": _link(
        "post",
        "/oauth/introspect",
        "RFC 7662, as a confidential client",
        requestBody={"token": "$response.body#/access_token", "token_type_hint": "access_token"},
    ),
    **bearer_links(ISSUED_BEARER),
}
SESSIONS_LINKS: Schema = {
    "EndSession": _link("delete", "/sessions/{session_id}", "end one session", _FIRST_SESSION),
    "AuditSession": _link(
        "get", "/audit/sessions/{session_id}", "needs the audit scope", _FIRST_SESSION
    ),
    "AuditSessionEvents": _link(
        "get", "/audit/sessions/{session_id}/events", "needs the audit scope", _FIRST_SESSION
    ),
}


def next_page(path: str, path_parameters: tuple[str, ...], query: tuple[str, ...]) -> Schema:
    parameters = {
        **{name: f"$request.path.{name}" for name in path_parameters},
        **{name: f"$request.query.{name}" for name in query},
        "after": "$response.body#/next",
        **_SAME_BEARER,
    }
    return {"NextPage": _link("get", path, "the following page of the same query", parameters)}
