"""Schemathesis against the served OpenAPI schema: every operation, positive and negative data.

Each operation gets a bounded number of generated requests on a live server. Any field the
fuzzer fills may be swapped for a value the server knows (a registered client, a real user's
password, a live access or refresh token, the allowed Origin), so that cases get past client and
bearer authentication and reach the handlers. Every response must be below 500, match the
documented schema, and every 4xx must be an RFC 6749 / RFC 6750 error with `no-store`.

A second run follows the schema's OpenAPI links (a token response to a refresh, a revocation, an
introspection and the bearer endpoints; a session list to ending one) as Schemathesis's state
machine, under the same checks.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, initialize
from schemathesis import APIOperation, BaseSchema, Case, CheckFunction, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.generation.meta import TestPhase
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput
from schemathesis.hooks import HookContext
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.stateful import OpenAPIStateMachine

from api.http.forms import FORM_TYPE
from api.ratelimit import RateLimit
from tests.api import conftest as api_fixtures
from tests.api.conftest import PASSWORD, SECRET, LiveServer

accounts = api_fixtures.accounts
live_factory = api_fixtures.live_factory


@pytest.fixture
def live(live_factory: Callable[..., LiveServer]) -> LiveServer:
    # Every case logs in from 127.0.0.1 on a stopped clock: no address limit, or most would 429.
    return live_factory(address_logins=RateLimit(limit=1_000_000))


pytestmark = [
    pytest.mark.slow,
    # The server runs in this process: when one of its pools opens a connection while
    # Hypothesis draws a case, psycopg_pool's expiry jitter uses the `random` module, which
    # Hypothesis takes for the strategy's own use of it.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

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
RECEIVER_SECRET = "a-shared-signals-receiver-secret-0123456789"
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
    user = _new_user(live)
    plain = live.login(user, scope="profile")
    auditor = live.login(user, scope="audit")
    access = [auditor["access_token"], plain["access_token"], _receiver_token(live)]
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


def _receiver_token(live: LiveServer) -> str:
    """A Shared Signals receiver's own token (ssf.manage), for the /ssf/ routes."""
    if live.accounts.client("receiver") is None:
        scopes = ("ssf.manage", "ssf.read")
        live.accounts.add_client("receiver", RECEIVER_SECRET, ("client_credentials",), scopes)
    form = {"grant_type": "client_credentials"}
    response = live.post("/oauth/token", data=form, auth=("receiver", RECEIVER_SECRET))
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _new_user(live: LiveServer) -> str:
    user = f"fuzz{next(_users)}"
    live.accounts.add_user(user, PASSWORD, ("profile", "audit"))
    return user


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
        _swap(case.headers, [n for n in case.headers if n in known], known, data.draw)
    if isinstance(case.body, MutableMapping):  # optional fields the fuzzer left out, too
        _swap(case.body, [n for n in known if n in BODY_FIELDS], known, data.draw)


def _swap(
    fields: MutableMapping[str, Any],
    names: list[str],
    known: dict[str, list[str]],
    draw: Callable[..., Any],
) -> None:
    for name in names:
        # None keeps the fuzzed value; Hypothesis leans to the first choices, the known ones.
        value = draw(st.sampled_from([*known[name], None]), label=name)
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
    # A bearer token; or one sent with the DPoP scheme (RFC 9449 §7.1), which a fuzzed header
    # may name.
    bearer = ('Bearer realm="session-ledger", error="', 'DPoP realm="session-ledger", error="')
    if response.status_code == 401 and _takes("Basic", operation):  # a bearer token, or a client
        assert challenge.startswith((*bearer, "Basic ")), challenge
    elif response.status_code == 401 and _takes("Bearer", operation):
        assert challenge.startswith(bearer), challenge
    elif response.status_code == 401:
        assert challenge.startswith("Basic "), challenge


def _header(response: Response, name: str) -> str:
    return ", ".join(response.headers.get(name, []))


def _takes(scheme: str, operation: Operation) -> bool:
    """Whether the operation's documented Authorization header admits the scheme."""
    return any(
        p.name == "Authorization" and scheme in str(p.definition.get("schema", {}).get("pattern"))
        for p in operation.headers
    )


# -- the schema's links --------------------------------------------------------------------------


def test_every_served_link_names_real_inputs(live: LiveServer) -> None:
    paths = live.get("/openapi.json").json()["paths"]
    links = _served_links(paths)
    assert len(links) >= 14
    for link in links:
        target = _operation_at(paths, link["operationRef"])
        names = {p["name"] for p in target.get("parameters", [])}
        assert set(link.get("parameters", {})) <= names, link
        form = target.get("requestBody", {}).get("content", {}).get(FORM_TYPE, {})
        assert set(link.get("requestBody", {})) <= set(form.get("schema", {}).get("properties", {}))


def test_following_the_token_links_by_hand_works(live: LiveServer) -> None:
    paths = live.get("/openapi.json").json()["paths"]
    links = paths["/oauth/token"]["post"]["responses"]["200"]["links"]
    login = {"grant_type": "password", "username": "ada", "password": PASSWORD, "client_id": "spa"}
    issued = live.post("/oauth/token", data=login).json()
    refresh = _follow(links["RefreshToken"]["requestBody"], login, issued)
    refreshed = live.post("/oauth/token", data=refresh)
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["refresh_token"] != issued["refresh_token"]
    bearer = _follow(links["ListSessions"]["parameters"], refresh, refreshed.json())
    listed = live.get("/sessions", headers=bearer)
    assert listed.status_code == 200, listed.text
    end = paths["/sessions"]["get"]["responses"]["200"]["links"]["EndSession"]["parameters"]
    ending = _follow(end, {"Authorization": bearer["Authorization"]}, listed.json())
    ended = live.delete(f"/sessions/{ending.pop('session_id')}", headers=ending)
    assert ended.status_code == 204, ended.text
    assert live.get("/sessions", headers=bearer).status_code == 401


def _served_links(paths: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        link
        for operations in paths.values()
        for operation in operations.values()
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]


def _operation_at(paths: dict[str, Any], reference: str) -> dict[str, Any]:
    _, _, path, method = reference.split("/")
    operation: dict[str, Any] = paths[path.replace("~1", "/").replace("~0", "~")][method]
    return operation


def _follow(values: dict[str, str], request: dict[str, Any], response: Any) -> dict[str, Any]:
    """A link's values as a client evaluates them (OpenAPI 3 runtime expressions, by hand)."""
    sources = {"$request.body": request, "$request.header": request, "$response.body": response}

    def resolve(expression: str) -> Any:
        source, _, pointer = expression.partition("#")
        if source.startswith("$request.header."):
            return request[source.removeprefix("$request.header.")]
        node = sources[source]
        for part in pointer.split("/")[1:]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def evaluate(value: str) -> Any:
        if value.startswith("$"):
            return resolve(value)
        return re.sub(r"\{(\$[^}]+)\}", lambda m: str(resolve(m[1])), value)

    return {name: evaluate(value) for name, value in values.items()}


# -- stateful: the schema's links -----------------------------------------------------------------

SCENARIOS = 30
STEPS = 8
LOGINS = ("POST /oauth/token", "POST /browser/login")
DROP = object()  # as a known value: remove the field
CLIENTS: dict[str, dict[str, Any]] = {
    "backend": {"client_id": "backend", "client_secret": SECRET},
    "spa": {"client_id": "spa", "client_secret": DROP},
}
Stats = Counter[tuple[str, str, int]]


def test_linked_operations_keep_their_contract(live: LiveServer) -> None:
    # Every scenario holds a user's tokens, which the Shared Signals routes refuse (403): their
    # links could never be followed, and only make the rule set larger. The stateless test
    # above fuzzes those routes with a receiver's token.
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json").exclude(path_regex="^/ssf/")
    known: dict[str, list[str]] = {}
    schema.hooks.register_hook_with_name(_known_headers(known), "flatmap_headers")
    schema.hooks.register_hook_with_name(_known_body(known), "flatmap_body")
    stats: Stats = Counter()
    workflow = _workflow(schema, live, known, stats)
    workflow.run(
        settings=settings(
            max_examples=SCENARIOS,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
    print(_summary(stats))
    assert any(kind == "link" and status < 300 for kind, _, status in stats)


def _workflow(
    schema: BaseSchema, live: LiveServer, known: dict[str, list[str]], stats: Stats
) -> type[OpenAPIStateMachine]:
    operations = {op.label: op for op in (r.ok() for r in schema.get_all_operations())}  # type: ignore[union-attr]
    logins = st.one_of(
        [operations[label].as_strategy(phase=TestPhase.STATEFUL) for label in LOGINS]
    )

    class Workflow(OpenAPIStateMachine):
        def setup(self) -> None:
            # The scenario logs in as another user, whose log-outs leave the known tokens alive.
            known.clear()
            known.update(_known_values(live), login=[_new_user(live)])
            stats[("run", "scenarios", 0)] += 1

        # Schemathesis reads client_id as a reference to a "Client" that no operation creates,
        # so it would never start a scenario with a login: every scenario starts with one here.
        @initialize(
            target=Bundle("catch_all"),
            case=logins,
            client=st.sampled_from(list(CLIENTS.values())),
            scope=st.sampled_from(["profile", "audit"]),
        )
        def log_in(self, case: Case[Any], client: dict[str, Any], scope: str) -> StepOutput:
            _fill_login(case, known, client, scope)
            step = StepInput.initial(case)
            self.recorder.record_case(case=case)
            self.control.record_step(step, self.recorder)
            return self.step(step)

        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"base_url": live.url, "timeout": 30}

        def step(self, input: StepInput) -> StepOutput:
            if input.transition is not None:
                _as_named_client(input.case)
            output = super().step(input)
            status = output.response.status_code
            stats[("operation", input.case.operation.label, status)] += 1
            if input.transition is not None and input.is_applied:
                stats[("link", input.transition.id, status)] += 1
            return output

        def validate_response(
            self,
            response: Response,
            case: Case[Any],
            additional_checks: list[CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            # A link or a known value can make a negative case valid: the mode is the sent one.
            is_positive = case.meta is None or case.meta.generation.mode.is_positive
            checks: list[CheckFunction] = CONFORMANCE if is_positive else [not_a_server_error]
            case.validate_response(response, checks=checks, transport_kwargs=kwargs or None)
            _assert_rfc_error(case.operation, response)

    workflow = type("LedgerWorkflow", (Workflow, schema.as_state_machine()), {})
    return cast(type[OpenAPIStateMachine], workflow)


def _summary(stats: Stats) -> str:
    rows: dict[tuple[str, str], list[str]] = {}
    for (kind, name, status), count in sorted(stats.items()):
        rows.setdefault((kind, name), []).append(f"{status}x{count}" if status else str(count))
    steps = sum(count for (kind, _, _), count in stats.items() if kind == "operation")
    lines = [f"{kind} {name}: {' '.join(counts)}" for (kind, name), counts in rows.items()]
    return "\n".join([f"stateful run: {steps} steps", *lines])


def _fill_login(
    case: Case[Any], known: dict[str, list[str]], client: dict[str, Any], scope: str
) -> None:
    assert isinstance(case.body, dict)
    case.body.update(username=known["login"][0], password=PASSWORD, scope=scope)
    if case.operation.path == "/browser/login":
        case.body["client_id"] = "spa"  # browser mode takes public clients only
        case.headers.update({"Origin": ORIGIN, "X-Requested-With": "fetch"})
    else:
        case.body["grant_type"] = "password"
        _apply(case.body, client)


def _known_headers(known: dict[str, list[str]]) -> Callable[..., st.SearchStrategy[Any]]:
    @st.composite
    def swapped(draw: st.DrawFn, headers: dict[str, Any]) -> dict[str, Any]:
        headers = dict(headers)
        _swap(headers, [name for name in headers if name in known], known, draw)
        return headers

    # A link's own values are not in `headers`: Schemathesis generates only the others.
    def flatmap_headers(context: HookContext, headers: Any) -> st.SearchStrategy[Any]:
        return swapped(headers) if isinstance(headers, dict) else st.just(headers)

    return flatmap_headers


def _known_body(known: dict[str, list[str]]) -> Callable[..., st.SearchStrategy[Any]]:
    @st.composite
    def swapped(draw: st.DrawFn, body: dict[str, Any], declared: set[str]) -> dict[str, Any]:
        body = dict(body)
        for choices in _known_fields(known):
            if choices[0].keys() <= declared:  # {} keeps the fuzzed fields
                _apply(body, draw(st.sampled_from([*choices, {}])))
        return body

    # A link's body values are merged over the result, so they win over known ones.
    def flatmap_body(context: HookContext, body: Any) -> st.SearchStrategy[Any]:
        if not isinstance(body, dict) or context.operation is None:
            return st.just(body)
        declared = {n for b in context.operation.body for n in b.definition["schema"]["properties"]}
        return swapped(body, declared)

    return flatmap_body


def _known_fields(known: dict[str, list[str]]) -> list[list[dict[str, Any]]]:
    # A client and its secret are chosen together. Logins are made by log_in, so no user is
    # needed; scope is only ever dropped, as a refresh must not send one.
    return [
        list(CLIENTS.values()),
        [{"scope": DROP}],
        [{"refresh_token": token} for token in known["refresh_token"]],
        [{"token": token} for token in known["token"]],
    ]


def _as_named_client(case: Case[Any]) -> None:
    # A client that follows a link authenticates as itself; the link names the client only.
    client = case.body.get("client_id") if isinstance(case.body, dict) else None
    if isinstance(client, str) and client in CLIENTS:
        _apply(cast(dict[str, Any], case.body), CLIENTS[client])


def _apply(fields: dict[str, Any], values: dict[str, Any]) -> None:
    for name, value in values.items():
        if value is DROP:
            fields.pop(name, None)
        else:
            fields[name] = value
