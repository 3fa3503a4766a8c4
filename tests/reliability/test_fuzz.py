"""Schemathesis against the served OpenAPI schema: every operation, positive and negative data.

Each operation gets a bounded number of generated requests on a live server. Any field the
fuzzer fills may be swapped for a value the server knows (a registered client, a real user's
password, a live access or refresh token, the allowed Origin), so that cases get past client and
bearer authentication and reach the handlers. Every response must be below 500, match the
documented schema, and every 4xx must be an RFC 6749 / RFC 6750 error with `no-store`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckFunction, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.throttle import RateLimit
from tests.api import conftest as api_fixtures
from tests.api.conftest import PASSWORD, SECRET, LiveServer

accounts = api_fixtures.accounts
live_factory = api_fixtures.live_factory


@pytest.fixture
def live(live_factory: Callable[..., LiveServer]) -> LiveServer:
    # Every case logs in from 127.0.0.1 on a stopped clock: no address limit, or most would 429.
    return live_factory(address_logins=RateLimit(limit=1_000_000))


pytestmark = pytest.mark.slow

EXAMPLES = 20
ORIGIN = "https://ledger.test"  # the live server's issuer, hence its only browser origin
CONFORMANCE: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
BODY_FIELDS = {
    "client_id",
    "client_secret",
    "username",
    "password",
    "scope",
    "refresh_token",
    "token",
}
_users = itertools.count()
Operation = APIOperation[Any, Any, Any, Any]


def test_every_operation_keeps_its_contract(live: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 19  # a route lost from the schema would go unfuzzed
    for operation in operations:
        known = _known_values(live)
        for mode in _modes(operation):
            _fuzz(live, operation, mode, known)


def _modes(operation: Operation) -> list[GenerationMode]:
    inputs = (operation.body, operation.headers, operation.query, operation.path_parameters)
    # An operation that takes no input has nothing to get wrong.
    if any(len(part) for part in inputs):
        return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    return [GenerationMode.POSITIVE]


def _known_values(live: LiveServer) -> dict[str, list[str]]:
    # A fresh user per operation: a fuzzed DELETE /sessions or a lockout must not starve the next.
    user = f"fuzz{next(_users)}"
    live.accounts.add_user(user, PASSWORD, ("profile", "audit"))
    plain = live.login(user, scope="profile")
    auditor = live.login(user, scope="audit")
    access = [auditor["access_token"], plain["access_token"]]
    return {
        "Authorization": [f"Bearer {token}" for token in access],
        "Origin": [ORIGIN],
        "X-Requested-With": ["fetch"],
        "client_id": ["backend", "spa"],
        "client_secret": [SECRET],
        "username": [user],
        "password": [PASSWORD],
        "scope": ["audit", "profile"],
        "refresh_token": [plain["refresh_token"]],
        "token": [auditor["refresh_token"], *access],
    }


def _fuzz(
    live: LiveServer, operation: Operation, mode: GenerationMode, known: dict[str, list[str]]
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Case[Any], data: st.DataObject) -> None:
        _swap_in_known_values(case, known, data)
        response = case.call(base_url=live.url, timeout=30)
        checks: list[CheckFunction] = [not_a_server_error]
        if mode is GenerationMode.POSITIVE:
            checks = CONFORMANCE
        case.validate_response(response, checks=checks)
        _assert_rfc_error(operation, response)

    run()


def _swap_in_known_values(
    case: Case[Any], known: dict[str, list[str]], data: st.DataObject
) -> None:
    if isinstance(case.headers, MutableMapping):
        _swap(case.headers, [n for n in case.headers if n in known], known, data)
    if isinstance(case.body, MutableMapping):  # optional fields the fuzzer left out, too
        _swap(case.body, [n for n in known if n in BODY_FIELDS], known, data)


def _swap(
    fields: MutableMapping[str, Any],
    names: list[str],
    known: dict[str, list[str]],
    data: st.DataObject,
) -> None:
    for name in names:
        # None keeps the fuzzed value; Hypothesis leans to the first choices, the known ones.
        value = data.draw(st.sampled_from([*known[name], None]), label=name)
        if value is not None:
            fields[name] = value


def _assert_rfc_error(operation: Operation, response: Response) -> None:
    if not 400 <= response.status_code < 500:
        return
    body: Any = response.json()
    assert isinstance(body.get("error"), str), body
    assert isinstance(body.get("error_description"), str), body
    assert _header(response, "cache-control") == "no-store", response.headers
    challenge = _header(response, "www-authenticate")
    if response.status_code == 401 and _is_bearer(operation):
        assert challenge.startswith('Bearer realm="session-ledger", error="'), challenge
    elif response.status_code == 401:
        assert challenge.startswith("Basic "), challenge


def _header(response: Response, name: str) -> str:
    return ", ".join(response.headers.get(name, []))


def _is_bearer(operation: Operation) -> bool:
    return any(p.name == "Authorization" for p in operation.headers)
