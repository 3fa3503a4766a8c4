"""OpenID Shared Signals: a receiver written from the specs alone (SSF 1.0, RFC 8417, RFC 8935,
RFC 8936), with httpx and PyJWT only, creates streams, asks for verification, and gets every
session end as a CAEP session-revoked SET by poll and by push, through outages of its own."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import jwt
import pytest

from api.signals import PUSH, SESSION_REVOKED, VERIFICATION
from tests.api.conftest import LiveServer, end_three_ways, sid
from tests.waiting import wait_until

RX_SECRET = "a-receiver-secret-with-enough-entropy-0123456789"
PUSH_SECRET = "Bearer push-credential-of-the-receiver-5b1f"
SSF = "/.well-known/ssf-configuration"


class ClientCredentials(httpx.Auth):
    """A bearer token from the client_credentials grant, fetched again when it is refused."""

    def __init__(self, token_url: str, client_id: str, secret: str) -> None:
        self._url, self._client = token_url, (client_id, secret)
        self._token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._token is None:
            self._token = self._fetch()
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            self._token = self._fetch()
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request

    def _fetch(self) -> str:
        form = {"grant_type": "client_credentials"}
        response = httpx.post(self._url, data=form, auth=self._client, timeout=30)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


class Receiver:
    """An SSF receiver: discovery, a client_credentials token, and the management API."""

    made: ClassVar[list[Receiver]] = []

    def __init__(self, live: LiveServer, client_id: str = "rx", scopes: tuple[str, ...] = ()):
        live.accounts.add_client(
            client_id, RX_SECRET, ("client_credentials",), scopes or ("ssf.manage", "ssf.read")
        )
        self.meta = httpx.get(f"{live.url}{SSF}").json()
        oauth = httpx.get(f"{live.url}/.well-known/oauth-authorization-server").json()
        auth = ClientCredentials(oauth["token_endpoint"], client_id, RX_SECRET)
        self.http = httpx.Client(base_url=live.url, timeout=30, auth=auth)
        self.client_id = client_id
        self.jwks = jwt.PyJWKClient(self.meta["jwks_uri"])
        Receiver.made.append(self)

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.http.post(self.meta["configuration_endpoint"], json=body)
        assert response.status_code == 201, response.text
        config: dict[str, Any] = response.json()
        assert config["iss"] == self.meta["issuer"]
        return config

    def verify(self, stream_id: str, state: str) -> None:
        body = {"stream_id": stream_id, "state": state}
        response = self.http.post(self.meta["verification_endpoint"], json=body)
        assert response.status_code == 204, response.text

    def poll(self, config: dict[str, Any], **body: Any) -> dict[str, Any]:
        response = self.http.post(config["delivery"]["endpoint_url"], json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def poll_all(self, config: dict[str, Any], count: int) -> dict[str, str]:
        """Poll (acknowledging what came) until `count` SETs came; jti to SET."""
        got: dict[str, str] = {}

        def more() -> bool:
            sets = self.poll(config, returnImmediately=True, ack=list(got))["sets"]
            got.update(sets)
            return len(got) >= count

        wait_until(more, timeout=30, what=f"{count} SETs by poll")
        self.poll(config, returnImmediately=True, ack=list(got), maxEvents=0)
        return got

    def decode(self, token: str) -> dict[str, Any]:
        """The SET's claims, verified as RFC 8417 and SSF 1.0 §4 say a receiver must."""
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "secevent+jwt"
        assert header["alg"] == "RS256"  # the CAEP interoperability profile
        key = self.jwks.get_signing_key(header["kid"])
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=["RS256"],
            audience=self.client_id,
            issuer=self.meta["issuer"],
            options={"require": ["iss", "aud", "jti", "iat"], "verify_exp": False},
        )
        assert "sub" not in claims
        assert "exp" not in claims
        assert len(claims["events"]) == 1
        return claims


@dataclass
class PushEndpoint:
    """A receiver's push endpoint (RFC 8935) on loopback: it keeps what it takes, and answers
    with `status` (202, or a failure the test sets), or holds the request while `hold` is set."""

    url: str = ""
    status: int = 202
    body: bytes = b""
    hold: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    received: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    attempts: int = 0


@pytest.fixture
def endpoint() -> Iterator[PushEndpoint]:
    state = PushEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.attempts += 1
            token = self.rfile.read(int(self.headers["Content-Length"])).decode()
            if state.hold.is_set():
                state.release.wait(10)  # longer than the push timeout: the pusher gives up
            status = state.status
            if status == 202:
                assert self.headers["Content-Type"] == "application/secevent+jwt"
                state.received.append(token)
                state.authorizations.append(self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/events"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def ssf(live_factory: Callable[..., LiveServer]) -> Iterator[LiveServer]:
    live = live_factory(issuer=None, signal_push_timeout=timedelta(seconds=0.5))
    yield live
    for receiver in Receiver.made:
        receiver.http.close()
    Receiver.made.clear()


def _told(receiver: Receiver, tokens: list[str]) -> tuple[str | None, dict[str, str]]:
    """The verification state and each ended session's reason that the SETs tell."""
    state, ends = None, {}
    for token in tokens:
        claims = receiver.decode(token)
        ((kind, event),) = claims["events"].items()
        if kind == VERIFICATION:
            assert claims["sub_id"]["format"] == "opaque"
            state = event["state"]
            continue
        assert kind == SESSION_REVOKED
        subject = claims["sub_id"]
        assert subject["format"] == "complex"
        assert subject["user"]["format"] == "iss_sub"
        assert subject["user"]["iss"] == receiver.meta["issuer"]
        assert event["reason_admin"]["en"]  # the interoperability profile: never empty
        ends[subject["session"]["id"]] = event["reason_admin"]["en"]
    return state, ends


def test_discovery_names_every_endpoint_and_the_delivery_methods(ssf: LiveServer) -> None:
    meta = httpx.get(f"{ssf.url}{SSF}").json()
    assert meta["spec_version"] == "1_0"
    assert meta["issuer"] == ssf.url
    assert set(meta["delivery_methods_supported"]) == {"urn:ietf:rfc:8935", "urn:ietf:rfc:8936"}
    for name in ("configuration_endpoint", "status_endpoint", "verification_endpoint"):
        assert meta[name].startswith(ssf.url)
    keys = httpx.get(meta["jwks_uri"]).json()["keys"]
    (rsa,) = [k for k in keys if k["kty"] == "RSA"]
    assert rsa["alg"] == "RS256"
    assert len(jwt.utils.base64url_decode(rsa["n"])) * 8 >= 2048


def test_a_receiver_gets_the_same_events_by_poll_and_by_push_each_verified_against_the_jwks(
    ssf: LiveServer, endpoint: PushEndpoint
) -> None:
    receiver = Receiver(ssf)
    polled = receiver.create(description="poll")
    assert polled["delivery"]["method"] == "urn:ietf:rfc:8936"
    assert polled["aud"] == "rx"
    delivery = {"method": PUSH, "endpoint_url": endpoint.url, "authorization_header": PUSH_SECRET}
    pushed = receiver.create(delivery=delivery, events_requested=[SESSION_REVOKED, "urn:x:y"])
    assert pushed["events_delivered"] == [SESSION_REVOKED]
    assert "authorization_header" not in pushed["delivery"]
    receiver.verify(polled["stream_id"], "poll-state")
    receiver.verify(pushed["stream_id"], "push-state")
    ended = dict(end_three_ways(ssf))

    by_poll = receiver.poll_all(polled, 4)
    wait_until(lambda: len(endpoint.received) >= 4, timeout=30, what="4 SETs by push")

    assert _told(receiver, list(by_poll.values())) == ("poll-state", ended)
    assert _told(receiver, endpoint.received) == ("push-state", ended)
    assert set(endpoint.authorizations) == {PUSH_SECRET}
    assert all(jti == receiver.decode(token)["jti"] for jti, token in by_poll.items())


def test_acknowledged_sets_are_not_sent_again_and_unacknowledged_ones_are(ssf: LiveServer) -> None:
    receiver = Receiver(ssf)
    config = receiver.create()
    ended = dict(end_three_ways(ssf))
    first = receiver.poll(config, returnImmediately=True, maxEvents=2)
    assert len(first["sets"]) == 2
    assert first["moreAvailable"] is True
    again = receiver.poll(config, returnImmediately=True)  # nothing acknowledged yet
    assert set(first["sets"]) < set(again["sets"])
    later = list(again["sets"])[-1]  # acknowledged out of order: kept until the rest follow
    rest = receiver.poll(config, returnImmediately=True, ack=[later])["sets"]
    assert set(rest) == set(again["sets"]) - {later}
    receiver.poll(config, returnImmediately=True, ack=list(rest), maxEvents=0)
    assert receiver.poll(config, returnImmediately=True) == {"sets": {}, "moreAvailable": False}
    assert _told(receiver, list(again["sets"].values())) == (None, ended)


def test_a_set_refused_by_poll_is_recorded_and_not_sent_again(ssf: LiveServer) -> None:
    receiver = Receiver(ssf)
    config = receiver.create()
    receiver.verify(config["stream_id"], "expected")
    (jti,) = receiver.poll(config, returnImmediately=True)["sets"]
    errs = {jti: {"err": "invalid_state", "description": "not the state we sent"}}
    answer = receiver.poll(config, returnImmediately=True, setErrs=errs)
    assert answer["sets"] == {}
    (rejected,) = [
        e.event for e in ssf.events("signal-stream:") if e.type == "SecurityEventRejected"
    ]
    assert (rejected.jti, rejected.err) == (jti, "invalid_state")  # type: ignore[attr-defined]


def test_a_long_poll_answers_as_soon_as_a_session_ends(ssf: LiveServer) -> None:
    receiver = Receiver(ssf)
    config = receiver.create()
    answers: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(receiver.poll(config)))
    waiting.start()
    out = ssf.login()
    ssf.delete(f"/sessions/{sid(out)}", headers=ssf.bearer(out["access_token"]))
    waiting.join(30)
    (answer,) = answers
    assert _told(receiver, list(answer["sets"].values())) == (None, {sid(out): "logout"})


def test_a_push_receiver_that_is_down_gets_every_event_after_it_returns(
    ssf: LiveServer, endpoint: PushEndpoint
) -> None:
    receiver = Receiver(ssf)
    endpoint.status = 500
    config = receiver.create(delivery={"method": PUSH, "endpoint_url": endpoint.url})
    ended = dict(end_three_ways(ssf))
    wait_until(lambda: _failures(ssf) >= 1, timeout=30, what="a failed push")
    attempts = endpoint.attempts
    endpoint.status = 202
    ssf.clock.advance(timedelta(seconds=3))  # past the back-off
    wait_until(lambda: len(endpoint.received) >= 3, timeout=30, what="every SET after the outage")
    assert attempts >= 1
    assert _told(receiver, endpoint.received) == (None, ended)
    assert _status(receiver, config)["status"] == "enabled"
    assert _failures(ssf) == 0


def test_a_push_that_times_out_is_retried_not_dropped(
    ssf: LiveServer, endpoint: PushEndpoint
) -> None:
    receiver = Receiver(ssf)
    endpoint.hold.set()
    receiver.create(delivery={"method": PUSH, "endpoint_url": endpoint.url})
    out = ssf.login()
    ssf.delete(f"/sessions/{sid(out)}", headers=ssf.bearer(out["access_token"]))
    wait_until(lambda: _failures(ssf) >= 1, timeout=30, what="a push that timed out")
    endpoint.hold.clear()
    endpoint.release.set()
    ssf.clock.advance(timedelta(seconds=3))
    wait_until(lambda: len(endpoint.received) >= 2, timeout=30, what="the SET again")
    assert {receiver.decode(t)["jti"] for t in endpoint.received} == {
        receiver.decode(endpoint.received[0])["jti"]
    }  # the timed-out push and its retry: the same SET, at least once


def test_a_set_the_push_receiver_refuses_with_400_is_recorded_and_the_next_one_follows(
    ssf: LiveServer, endpoint: PushEndpoint
) -> None:
    receiver = Receiver(ssf)
    endpoint.status, endpoint.body = 400, json.dumps({"err": "invalid_key"}).encode()
    config = receiver.create(delivery={"method": PUSH, "endpoint_url": endpoint.url})
    receiver.verify(config["stream_id"], "first")
    wait_until(lambda: _rejections(ssf), timeout=30, what="the refusal recorded")
    endpoint.status = 202
    receiver.verify(config["stream_id"], "second")
    wait_until(lambda: endpoint.received, timeout=30, what="the next SET")
    assert _told(receiver, endpoint.received) == ("second", {})
    assert [r.err for r in _rejections(ssf)] == ["invalid_key"]


def test_a_paused_stream_holds_its_events_and_a_disabled_one_drops_them(ssf: LiveServer) -> None:
    receiver = Receiver(ssf)
    config = receiver.create()
    stream_id = config["stream_id"]
    assert _set_status(receiver, stream_id, "paused", "maintenance") == {
        "stream_id": stream_id, "status": "paused", "reason": "maintenance",
    }  # fmt: skip
    receiver.verify(stream_id, "held")
    assert receiver.poll(config, returnImmediately=True)["sets"] == {}
    _set_status(receiver, stream_id, "enabled")
    assert _told(receiver, list(receiver.poll_all(config, 1).values())) == ("held", {})

    _set_status(receiver, stream_id, "disabled")
    receiver.verify(stream_id, "dropped")
    _set_status(receiver, stream_id, "enabled")
    receiver.verify(stream_id, "after")
    assert _told(receiver, list(receiver.poll_all(config, 1).values())) == ("after", {})
    changes = [e.event for e in ssf.events("signal-stream:") if e.type.endswith("StatusChanged")]
    assert [c.status for c in changes] == ["paused", "enabled", "disabled", "enabled"]  # type: ignore[attr-defined]


def test_creating_and_deleting_a_stream_are_events_and_the_push_credential_is_never_one(
    ssf: LiveServer, endpoint: PushEndpoint
) -> None:
    receiver = Receiver(ssf)
    delivery = {"method": PUSH, "endpoint_url": endpoint.url, "authorization_header": PUSH_SECRET}
    config = receiver.create(delivery=delivery, description="audit me")
    stream_id = config["stream_id"]
    listed = receiver.http.get(receiver.meta["configuration_endpoint"]).json()
    assert [s["stream_id"] for s in listed] == [stream_id]
    response = receiver.http.delete(
        receiver.meta["configuration_endpoint"], params={"stream_id": stream_id}
    )
    assert response.status_code == 204
    assert response.headers["Cache-Control"] == "no-store"
    read = receiver.http.get(
        receiver.meta["configuration_endpoint"], params={"stream_id": stream_id}
    )
    assert read.status_code == 404
    events = ssf.events(f"signal-stream:{stream_id}")
    assert [e.type for e in events] == ["SignalStreamCreated", "SignalStreamDeleted"]
    created = events[0].event
    assert created.client_id == "rx"  # type: ignore[attr-defined]
    assert created.ip == "127.0.0.1"  # type: ignore[attr-defined]
    assert "push-credential" not in json.dumps([(e.data, e.metadata) for e in events])
    with ssf.pool.connection() as conn:
        query = "SELECT count(*) FROM events WHERE (data::text || metadata::text) LIKE %s"
        stored = conn.execute(query, ("%push-credential%",))
        assert stored.fetchone() == (0,)


def test_a_receiver_sees_only_its_own_streams(ssf: LiveServer) -> None:
    mine, theirs = Receiver(ssf), Receiver(ssf, "other")
    config = mine.create()
    assert theirs.http.get(theirs.meta["configuration_endpoint"]).json() == []
    calls: list[Callable[[], httpx.Response]] = [
        lambda: theirs.http.get(SSF_STATUS, params={"stream_id": config["stream_id"]}),
        lambda: theirs.http.post(SSF_VERIFY, json={"stream_id": config["stream_id"]}),
        lambda: theirs.http.post(config["delivery"]["endpoint_url"], json={}),
        lambda: theirs.http.delete(SSF_STREAMS, params={"stream_id": config["stream_id"]}),
    ]
    for call in calls:
        response = call()
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found"


SSF_STREAMS, SSF_STATUS, SSF_VERIFY = "/ssf/streams", "/ssf/status", "/ssf/verify"


@pytest.mark.parametrize("path", [SSF_STREAMS, f"{SSF_STATUS}?stream_id=x"])
def test_a_call_without_a_token_is_refused_with_a_bearer_challenge(
    ssf: LiveServer, path: str
) -> None:
    response = httpx.get(f"{ssf.url}{path}")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["Cache-Control"] == "no-store"


def test_a_token_without_the_scope_or_of_a_user_is_refused_403(ssf: LiveServer) -> None:
    reader = Receiver(ssf, "reader", scopes=("ssf.read",))
    assert reader.http.get(SSF_STREAMS).status_code == 200  # reading is allowed
    refused = reader.http.post(SSF_STREAMS, json={})
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    user = ssf.login()
    as_user = httpx.get(f"{ssf.url}{SSF_STREAMS}", headers=ssf.bearer(user["access_token"]))
    assert as_user.status_code == 403
    assert "client_credentials" in as_user.json()["error_description"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"delivery": "push"}, "'delivery' must be an object"),
        ({"delivery": {"method": "urn:example:smoke-signals"}}, "delivery method must be"),
        ({"delivery": {"method": PUSH}}, "needs the receiver's endpoint_url"),
        ({"delivery": {"method": PUSH, "endpoint_url": "http://example.com/in"}}, "https"),
        ({"delivery": {"method": PUSH, "endpoint_url": "https://x.test/#f"}}, "fragment"),
        ({"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": "https://x.test"}}, "poll"),
        ({"events_requested": "all"}, "array of strings"),
        ({"description": 7}, "non-empty string"),
    ],
)
def test_a_malformed_stream_is_refused_with_a_clear_400(
    ssf: LiveServer, body: dict[str, Any], says: str
) -> None:
    response = Receiver(ssf).http.post(SSF_STREAMS, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert says in response.json()["error_description"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"maxEvents": -1}, "non-negative integer"),
        ({"maxEvents": True}, "non-negative integer"),
        ({"returnImmediately": "yes"}, "boolean"),
        ({"ack": "all"}, "array of jti"),
        ({"ack": ["not-a-jti"]}, "not the jti of a SET of this stream"),
        ({"setErrs": {"x": "bad"}}, "'setErrs'"),
        ({"setErrs": {"x": {"description": "no err"}}}, "'err' is missing"),
    ],
)
def test_a_malformed_poll_is_refused_with_a_clear_400(
    ssf: LiveServer, body: dict[str, Any], says: str
) -> None:
    receiver = Receiver(ssf)
    config = receiver.create()
    response = receiver.http.post(config["delivery"]["endpoint_url"], json=body)
    assert response.status_code == 400
    assert says in response.json()["error_description"]


def test_a_push_stream_cannot_be_polled_nor_set_to_an_unknown_status(
    ssf: LiveServer, endpoint: PushEndpoint
) -> None:
    receiver = Receiver(ssf)
    config = receiver.create(delivery={"method": PUSH, "endpoint_url": endpoint.url})
    polled = receiver.http.post(f"/ssf/poll/{config['stream_id']}", json={})
    assert polled.status_code == 400
    assert "push" in polled.json()["error_description"]
    status = {"stream_id": config["stream_id"], "status": "asleep"}
    assert receiver.http.post(SSF_STATUS, json=status).status_code == 400


def test_metrics_show_each_streams_lag_until_it_is_delivered(ssf: LiveServer) -> None:
    receiver = Receiver(ssf)
    config = receiver.create()
    receiver.verify(config["stream_id"], "s")
    ssf.clock.advance(timedelta(seconds=30))
    assert _lag(ssf, config["stream_id"]) >= 30
    receiver.poll_all(config, 1)
    assert _lag(ssf, config["stream_id"]) == 0


def _lag(live: LiveServer, stream_id: str) -> float:
    text = live.get("/metrics").text
    labels = f'client_id="rx",method="urn:ietf:rfc:8936",stream_id="{stream_id}"'
    prefix = f"session_ledger_signal_stream_lag_seconds{{{labels}}}"
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.split()[-1])


def _set_status(
    receiver: Receiver, stream_id: str, status: str, reason: str | None = None
) -> dict[str, Any]:
    body = {"stream_id": stream_id, "status": status}
    response = receiver.http.post(
        SSF_STATUS, json=body if reason is None else {**body, "reason": reason}
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer == _status_of(receiver, stream_id)
    return answer


def _status_of(receiver: Receiver, stream_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = receiver.http.get(SSF_STATUS, params={"stream_id": stream_id}).json()
    return answer


def _status(receiver: Receiver, config: dict[str, Any]) -> dict[str, Any]:
    return _status_of(receiver, config["stream_id"])


def _failures(live: LiveServer) -> int:
    with live.pool.connection() as conn:
        row = conn.execute("SELECT coalesce(max(failures), 0) FROM signal_streams").fetchone()
    assert row is not None
    return int(row[0])


def _rejections(live: LiveServer) -> list[Any]:
    return [e.event for e in live.events("signal-stream:") if e.type == "SecurityEventRejected"]
