"""A seeded generator of realistic session histories, for the replay benchmark.

Users log in through one of a few clients, refresh about every 15 minutes with activity reported
in between (debounced as the service debounces it), then log out, walk away (the idle timeout is
recorded when the session is next touched, at the moment it happened) or keep working until the
absolute limit refuses them and they log in again. Now and then a stolen refresh token is replayed
(reuse detected, the session revoked); typos and password guessing fail logins, and a burst of
guesses locks the name.

Every event comes out of the deciders and folds in `projections/`, so the history is one the
service could have written. Records leave in the order the service would have appended them (by
the moment each decision was taken), each stream in version order with contiguous versions.
"""

from __future__ import annotations

import base64
import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger.events import Event, SessionEnded, event_data
from ledger.records import ImportRecord, Stream
from ledger.serialization import JsonValue
from projections import principal, session
from projections.principal import LockoutPolicy, PrincipalState
from projections.session import Decision, Policy, SessionState
from projections.streams import principal_stream, session_stream

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
CLIENTS = (
    ("web-spa", ("openid", "profile", "sessions")),
    ("mobile-app", ("openid", "profile")),
    ("ops-cli", ("openid", "sessions", "admin")),
)
USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/141.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Version/18.2 Safari/605",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_2 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "okhttp/4.12.0 (Android 15; Pixel 8)",
    "ops-cli/2.3.1 python-httpx/0.28",
)
GUESSED_NAMES = ("admin", "root", "test", "administrator", "oracle", "support", "guest")
ATTACKER_AGENT = "python-requests/2.32.3"
USERS_PER_EVENT = 1 / 400  # 2,500 users for a million events
SECOND_DEVICE = 0.3  # users who also keep a session going on a second device
TYPO = 0.05  # logins preceded by a mistyped password
LOGS_OUT = 0.45  # sessions ended by the user rather than left to expire
REUSE = 0.004  # sessions whose refresh token is stolen and replayed
ATTACKS_PER_USER = 1 / 150  # concurrent password-guessing campaigns
REFRESH_EVERY = timedelta(minutes=14)
Action = Callable[[datetime], None]


@dataclass
class History:
    """What the generated records add up to; filled in as they are consumed."""

    events: int = 0
    users: int = 0
    sessions: dict[str, SessionState] = field(default_factory=dict)
    """Each session's state after its last record (by session id, without the prefix)."""
    last_event: dict[str, datetime] = field(default_factory=dict)
    """When each session's last record occurred."""
    principals: dict[str, PrincipalState] = field(default_factory=dict)
    """Each principal's state after its last record (by user name)."""
    counts: Counter[str] = field(default_factory=Counter)
    """Records per event type, SessionEnded per reason."""


@dataclass(frozen=True)
class _Device:
    user: str
    ip: str
    user_agent: str
    client_id: str
    scope: tuple[str, ...]


@dataclass
class _Live:
    """A session being simulated: its folded state and what its user does next."""

    state: SessionState
    device: _Device
    active_until: datetime
    logs_out: bool
    next_refresh: datetime
    next_activity: datetime


def generate(seed: int, events: int, history: History) -> Iterator[ImportRecord]:
    """At least `events` records of a history seeded by `seed`, filling in `history` as they go."""
    sim = _Simulation(random.Random(seed), history, max(50, math.ceil(events * USERS_PER_EVENT)))
    for batch in sim.run():
        yield from batch
        history.events += len(batch)
        if history.events >= events:  # whole decisions only: a stream never ends mid-append
            return


class _Simulation:
    def __init__(self, rng: random.Random, history: History, users: int) -> None:
        self.rng, self.history = rng, history
        self.policy, self.lockout = Policy(), LockoutPolicy()
        self.heap: list[tuple[datetime, int, Action]] = []
        self.seq = 0
        self.out: list[ImportRecord] = []
        history.users = users
        for n in range(users):
            for _ in range(2 if rng.random() < SECOND_DEVICE else 1):
                self._at(T0 + self._minutes(0, 720), self._login(self._device(f"user{n:05d}")))
        for _ in range(max(1, round(users * ATTACKS_PER_USER))):
            self._at(T0 + self._minutes(0, 720), self._attack())

    def run(self) -> Iterator[list[ImportRecord]]:
        while self.heap:
            when, _, action = heapq.heappop(self.heap)
            action(when)
            if self.out:
                yield self.out
                self.out = []

    # -- sessions ---------------------------------------------------------------------------------

    def _login(self, device: _Device, *, may_mistype: bool = True) -> Action:
        def login(now: datetime) -> None:
            if principal.is_locked(self._principal(device.user), now):
                self._fail(device.user, "wrong_password", device.ip, device.user_agent, now)
                self._at(now + self._minutes(5, 45), self._login(device))
            elif may_mistype and self.rng.random() < TYPO:
                self._fail(device.user, "wrong_password", device.ip, device.user_agent, now)
                self._at(now + self._seconds(4, 40), self._login(device, may_mistype=False))
            else:
                self._start(device, now)

        return login

    def _start(self, device: _Device, now: datetime) -> None:
        started = session.start(
            user=device.user,
            client_id=device.client_id,
            scope=device.scope,
            refresh_token_hash=self._token_hash(),
            ip=device.ip,
            user_agent=device.user_agent,
            now=now,
        )
        session_id = base64.urlsafe_b64encode(self.rng.randbytes(16)).rstrip(b"=").decode()
        state = session.evolve(None, session_id, started)
        live = _Live(
            state,
            device,
            now + self._active_for(),
            self.rng.random() < LOGS_OUT,
            now + REFRESH_EVERY + self._seconds(0, 60),
            now + self._think(),
        )
        self._emit_session(live, (started,), device.ip, device.user_agent, from_state=None)
        self._at(min(live.next_refresh, live.next_activity), self._tick(live))
        if self.rng.random() < REUSE:
            self._at(now + (live.active_until - now) * self.rng.random(), self._reuse(live))

    def _tick(self, live: _Live) -> Action:
        def tick(now: datetime) -> None:
            state, device = live.state, live.device
            if state.ended_at is not None:  # revoked by a reuse: the user logs in again
                self._at(now + self._seconds(5, 120), self._login(device))
                return
            if now >= live.active_until:
                self._leave(live, now)
                return
            if live.next_refresh <= live.next_activity:
                self._refresh(live, state.generation, now, device.ip, device.user_agent)
                live.next_refresh = now + REFRESH_EVERY + self._seconds(0, 60)
            else:
                decision = session.decide_activity(state, now, self.policy)
                self._decided(live, decision, device.ip, device.user_agent)
                live.next_activity = now + self._think()
            if live.state.ended_at is not None:  # the absolute limit refused it
                self._at(now + self._seconds(5, 120), self._login(device))
                return
            following = min(live.next_refresh, live.next_activity, live.active_until)
            self._at(following, self._tick(live))

        return tick

    def _leave(self, live: _Live, now: datetime) -> None:
        device = live.device
        if live.logs_out:
            decision = session.decide_end(live.state, "logout", now, self.policy)
            self._decided(live, decision, device.ip, device.user_agent)
            self._at(now + self._gap(), self._login(device))
            return
        expires, _ = session.expiry(live.state, self.policy)
        self._at(expires + self._minutes(1, 240), self._return(live))

    def _return(self, live: _Live) -> Action:
        def come_back(now: datetime) -> None:
            device = live.device  # refused: the expiry is recorded at the moment it happened
            self._refresh(live, live.state.generation, now, device.ip, device.user_agent)
            self._at(now + self._seconds(5, 60), self._login(device))

        return come_back

    def _reuse(self, live: _Live) -> Action:
        def replay_stolen(now: datetime) -> None:
            if live.state.generation < 2:
                return
            ip = f"203.0.113.{self.rng.randrange(1, 255)}"
            self._refresh(live, live.state.generation - 1, now, ip, ATTACKER_AGENT)

        return replay_stolen

    def _refresh(
        self, live: _Live, presented: int, now: datetime, ip: str, user_agent: str
    ) -> None:
        decision = session.decide_refresh(
            live.state,
            presented,
            next_token_hash=self._token_hash(),
            ip=ip,
            user_agent=user_agent,
            now=now,
            policy=self.policy,
        )
        self._decided(live, decision, ip, user_agent)

    def _decided(self, live: _Live, decision: Decision, ip: str, user_agent: str) -> None:
        if decision.events:
            self._emit_session(live, decision.events, ip, user_agent, from_state=live.state)

    def _emit_session(
        self,
        live: _Live,
        events: Sequence[Event],
        ip: str,
        user_agent: str,
        *,
        from_state: SessionState | None,
    ) -> None:
        session_id = live.state.session_id
        meta = self._metadata(ip, user_agent, live.device.client_id)
        state = from_state
        for event in events:
            state = session.evolve(state, session_id, event)
            self._record(session_stream(session_id), state.version, event, meta)
        assert state is not None
        live.state = self.history.sessions[session_id] = state
        self.history.last_event[session_id] = events[-1].occurred_at

    # -- principals -------------------------------------------------------------------------------

    def _attack(self) -> Action:
        if self.rng.random() < 0.8:
            name = f"user{self.rng.randrange(self.history.users):05d}"
        else:
            name = self.rng.choice(GUESSED_NAMES)
        reason = "wrong_password" if name.startswith("user") else "unknown_user"
        ip = f"198.51.100.{self.rng.randrange(1, 255)}"
        left = self.rng.randint(3, 15)

        def guess(now: datetime) -> None:
            nonlocal left
            self._fail(name, reason, ip, ATTACKER_AGENT, now)
            left -= 1
            if left:
                self._at(now + self._seconds(2, 20), guess)
            else:
                self._at(now + self._minutes(30, 720), self._attack())

        return guess

    def _fail(self, name: str, reason: str, ip: str, user_agent: str, now: datetime) -> None:
        state = self._principal(name)
        events = principal.decide_failure(
            state, reason, ip=ip, user_agent=user_agent, now=now, policy=self.lockout
        )
        meta = self._metadata(ip, user_agent, None)
        for event in events:
            state = principal.evolve(state, event)
            self._record(principal_stream(name), state.version, event, meta)
        self.history.principals[name] = state

    def _principal(self, name: str) -> PrincipalState:
        return self.history.principals.get(name) or PrincipalState(name=name)

    # -- helpers ----------------------------------------------------------------------------------

    def _record(
        self,
        stream: Stream,
        version: int,
        event: Event,
        meta: dict[str, JsonValue],
    ) -> None:
        cls = type(event)
        self.out.append(
            ImportRecord(
                stream.id,
                stream.type,
                version,
                cls.type_name,
                cls.schema_version,
                event.occurred_at,
                event_data(event),
                meta,
            )
        )
        reason = f":{event.reason}" if isinstance(event, SessionEnded) else ""
        self.history.counts[cls.type_name + reason] += 1

    def _metadata(self, ip: str, user_agent: str, client_id: str | None) -> dict[str, JsonValue]:
        meta: dict[str, JsonValue] = {
            "request_id": f"{self.rng.getrandbits(128):032x}",
            "ip": ip,
            "user_agent": user_agent,
        }
        if client_id is not None:
            meta["client_id"] = client_id
        return meta

    def _device(self, user: str) -> _Device:
        client_id, scope = self.rng.choice(CLIENTS)
        network = self.rng.choice(("192.0.2", "10.20.30", "172.16.4"))
        ip = f"{network}.{self.rng.randrange(1, 255)}"
        return _Device(user, ip, self.rng.choice(USER_AGENTS), client_id, scope)

    def _active_for(self) -> timedelta:
        """How long the user keeps using a session: mostly short, many a workday, a few longer
        than the absolute limit."""
        kind = self.rng.random()
        if kind < 0.55:
            return timedelta(seconds=min(self.rng.lognormvariate(math.log(35 * 60), 0.7), 7200))
        if kind < 0.93:
            return self._minutes(120, 420)
        return self._minutes(490, 660)

    def _think(self) -> timedelta:
        """Time to the client's next authenticated call (each one reports activity)."""
        return timedelta(seconds=max(15.0, self.rng.expovariate(1 / 210)))

    def _gap(self) -> timedelta:
        return timedelta(seconds=max(120.0, self.rng.expovariate(1 / (8 * 3600))))

    def _token_hash(self) -> str:
        return f"{self.rng.getrandbits(256):064x}"

    def _minutes(self, low: float, high: float) -> timedelta:
        return timedelta(minutes=self.rng.uniform(low, high))

    def _seconds(self, low: float, high: float) -> timedelta:
        return timedelta(seconds=self.rng.uniform(low, high))

    def _at(self, when: datetime, action: Action) -> None:
        heapq.heappush(self.heap, (when, self.seq, action))
        self.seq += 1
