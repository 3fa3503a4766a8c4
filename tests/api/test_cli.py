"""The command line, run as a real subprocess, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import platformdirs
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from api.accounts import Accounts
from api.sessions import Failure, RequestInfo, record_failure
from api.settings import DEFAULT_DATA_DIR
from ledger.chain import Envelope
from ledger.db import SCHEMA_VERSION
from ledger.events import ActivityRecorded, SessionEnded
from ledger.store import EventStore, Stream
from projections import session
from projections.principal import LockoutPolicy
from projections.session import Policy
from projections.sql.inline import load_principal, save_session
from tests.api.conftest import client_secret_key

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
EXECUTABLE = shutil.which("session-ledger") or str(Path(sys.executable).parent / "session-ledger")


def run(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return subprocess.run(
        [EXECUTABLE, *args],
        env={**clean, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_verify_exits_0_when_every_chain_holds(store: EventStore, db_url: str) -> None:
    store.append(Stream("s-1", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    store.append(Stream("s-1", "session"), 1, [ActivityRecorded(occurred_at=T0)])
    store.append(Stream("s-2", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    result = run("verify", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "every hash chain holds: 3 event(s) in 2 stream(s) checked\n"


def test_verify_exits_1_naming_a_tampered_stream_and_version(
    store: EventStore, db_url: str, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    store.append(Stream("s-1", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    store.append(Stream("s-2", "session"), 0, [ActivityRecorded(occurred_at=T0)])
    store.append(Stream("s-2", "session"), 1, [SessionEnded(occurred_at=T0, reason="logout")])
    admin.execute("ALTER TABLE events DISABLE TRIGGER USER")
    admin.execute(
        "UPDATE events SET data = '{\"reason\": \"idle\"}' WHERE stream_id = 's-2' AND version = 2"
    )
    row = admin.execute(
        "SELECT stream_id, stream_type, version, type, schema_version, occurred_at, data,"
        " metadata, prev_hash, hash FROM events WHERE stream_id = 's-2' AND version = 2"
    ).fetchone()
    assert row is not None
    *fields, prev_hash, written = row
    assert isinstance(prev_hash, bytes)
    assert isinstance(written, bytes)
    recomputed = Envelope.of(*fields).link_hash(prev_hash)  # type: ignore[arg-type]
    result = run("verify", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert "stream s-2 version 2" in line
    assert f"expected {recomputed.hex()}, found {written.hex()}" in line
    assert recomputed != written
    assert "s-1" not in result.stdout
    assert "3 event(s) in 2 stream(s) checked; 1 have a broken hash chain" in result.stderr


def test_bad_database_url_exits_2_with_one_clear_line() -> None:
    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    result = run("verify", env={"LEDGER_DATABASE_URL": url})
    assert result.returncode == 2
    assert result.stderr.startswith("session-ledger: PostgreSQL is unavailable")
    assert "Traceback" not in result.stderr


def test_empty_setting_is_named_at_start_up() -> None:
    result = run("db", "init", env={"LEDGER_DATABASE_URL": " "})
    assert result.returncode == 2
    assert "LEDGER_DATABASE_URL is set but empty" in result.stderr


def test_db_init_applies_the_schema(pg_server_url: str, db_url: str) -> None:
    result = run("db", "init", env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stdout


@pytest.fixture
def embedded_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "ledger-data" / "pgdata"
    yield data_dir
    run("db", "stop", env={"LEDGER_DATA_DIR": str(data_dir)})


@pytest.mark.slow
def test_db_url_starts_the_embedded_server_and_reports_a_working_url(embedded_dir: Path) -> None:
    env = {"LEDGER_DATA_DIR": str(embedded_dir)}
    created = run("db", "init", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout == "created the schema in a new database\n"
    assert created.stderr.count(str(embedded_dir)) == 1  # named once
    run("db", "stop", env=env)
    result = run("db", "url", env=env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        assert row == (SCHEMA_VERSION,)
        server_version = conn.info.server_version
    assert server_version >= 160000
    assert (embedded_dir / "PG_VERSION").exists()

    again = run("db", "url", env=env)
    assert again.stdout.strip() == url

    stopped = run("db", "stop", env=env)
    assert stopped.stdout.strip() == "stopped"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()


def test_users_add_reads_the_password_from_stdin(db_url: str, pool: ConnectionPool) -> None:
    result = run(
        "users", "add", "ada", "--password-stdin", "--scope", "profile", "--scope", "email",
        env={"LEDGER_DATABASE_URL": db_url}, stdin="a long passphrase\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "a long passphrase" not in result.stdout + result.stderr
    accounts = Accounts(pool)
    user = accounts.user("ada")
    assert user is not None
    assert user.scopes == ("profile", "email")
    assert user.password_hash.startswith("$argon2id$")
    assert accounts.check_password(user, "a long passphrase")
    again = run("users", "add", "ada", "--password-stdin", env={"LEDGER_DATABASE_URL": db_url},
                stdin="other password\n")  # fmt: skip
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_confidential_client_gets_a_secret_printed_once(db_url: str, pool: ConnectionPool) -> None:
    result = run(
        "clients", "add", "backend", "--confidential", "--grant", "password",
        env={"LEDGER_DATABASE_URL": db_url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    secret = result.stdout.split("store it now): ")[1].strip()
    accounts = Accounts(pool, secret_key=client_secret_key(pool))
    client = accounts.client("backend")
    assert client is not None
    assert client.grants == ("password",)
    assert accounts.check_secret(client, secret)
    assert not accounts.check_secret(client, secret + "x")
    assert secret not in (client.secret_hash or "")


def test_a_client_can_be_made_to_require_dpop(db_url: str, pool: ConnectionPool) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    result = run("clients", "add", "strict", "--grant", "password", "--require-dpop", env=env)
    assert result.returncode == 0, result.stderr
    assert "DPoP proofs required" in result.stdout
    assert run("clients", "add", "lax", "--grant", "password", env=env).returncode == 0
    strict, lax = Accounts(pool).client("strict"), Accounts(pool).client("lax")
    assert strict is not None
    assert lax is not None
    assert (strict.dpop_bound, lax.dpop_bound) == (True, False)


def test_public_client_and_secret_from_stdin(db_url: str, pool: ConnectionPool) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    back = ("--redirect-uri", "https://app.test/cb", "--redirect-uri", "http://127.0.0.1:9/cb")
    assert run("clients", "add", "spa", *back, env=env).returncode == 0
    spa = Accounts(pool).client("spa")
    assert spa is not None
    assert (spa.is_confidential, spa.grants) == (False, ("authorization_code", "refresh_token"))
    assert spa.redirect_uris == ("https://app.test/cb", "http://127.0.0.1:9/cb")
    strong = "Xq7-vT2_pL9wZr4KmN8sB3yH6jD1cF5g"  # what openssl rand -base64 24 gives
    api_add = ("clients", "add", "api", "--secret-stdin", "--grant", "client_credentials")
    piped = run(*api_add, env=env, stdin=f"{strong}\n")
    assert piped.returncode == 0, piped.stderr
    assert strong not in piped.stdout
    accounts = Accounts(pool, secret_key=client_secret_key(pool))
    api = accounts.client("api")
    assert api is not None
    assert accounts.check_secret(api, strong)


def test_account_commands_change_the_account_and_say_how_many_sessions_ended(
    db_url: str, pool: ConnectionPool
) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    assert (
        run(
            "users", "add", "ada", "--password-stdin", env=env, stdin="the first password\n"
        ).returncode
        == 0
    )
    outputs = [
        run("users", "set-scopes", "ada", "profile", "email", env=env),
        run(
            "users",
            "set-password",
            "ada",
            "--password-stdin",
            env=env,
            stdin="the second password\n",
        ),
        run("sessions", "revoke", "--user", "ada", env=env),
        run("users", "remove", "ada", env=env),
    ]
    assert [r.returncode for r in outputs] == [0, 0, 0, 0], [r.stderr for r in outputs]
    assert [r.stdout.strip() for r in outputs] == [
        "ada now holds profile email; 0 sessions ended",
        "password of ada replaced; 0 sessions ended",
        "0 sessions of ada ended",
        "user ada removed; 0 sessions ended",
    ]
    assert Accounts(pool).user("ada") is None
    types = [e.type for e in EventStore(pool).read_stream("principal:ada")]
    assert types == ["UserScopesChanged", "PasswordChanged", "UserRemoved"]
    assert "second pw" not in str(EventStore(pool).read_stream("principal:ada"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("users", "remove", "nobody"), "user 'nobody' does not exist"),
        (("users", "set-scopes", "nobody", "x"), "user 'nobody' does not exist"),
        (("users", "set-scopes", "ada", "bad scope"), "is not a valid scope"),
    ],
)
def test_account_commands_refuse_naming_the_problem(
    db_url: str, accounts: Accounts, args: tuple[str, ...], message: str
) -> None:
    result = run(*args, env={"LEDGER_DATABASE_URL": db_url})
    assert result.returncode == 1
    assert message in result.stderr


@pytest.mark.parametrize(
    "weak",
    [
        "0123456789abcdef-x",  # 18 characters: about 110 bits at most
        "a" * 64,  # long, but one character
        "7f3a9c2e5b1d8f4a",  # 64 bits of hex
    ],
)
def test_a_supplied_client_secret_under_128_bits_is_refused_naming_the_rule(
    db_url: str, pool: ConnectionPool, weak: str
) -> None:
    result = run(
        "clients", "add", "api", "--secret-stdin", "--grant", "client_credentials",
        env={"LEDGER_DATABASE_URL": db_url}, stdin=f"{weak}\n",
    )  # fmt: skip
    assert result.returncode == 1
    assert "at least 128 are needed" in result.stderr
    assert weak not in result.stderr
    assert Accounts(pool).client("api") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("clients", "add", "spa", "--grant", "implicit"), "grants must be some of"),
        (("users", "add", "eve", "--password-stdin"), "the password is empty"),
        (("users", "add", "eve", "--password-stdin"), "has 8 characters; at least 12 are needed"),
        (("clients", "add", "web"), "needs at least one --redirect-uri"),
        (("clients", "add", "web", "--redirect-uri", "http://app.test/cb"), "must use https"),
        (("clients", "add", "web", "--redirect-uri", "https://app.test/cb#x"), "fragment"),
        (("clients", "add", "web", "--redirect-uri", "/cb"), "absolute URI"),
        (("users", "add", "bad name", "--password-stdin"), "must be 1 to 128"),
        (("users", "add", "ada", "--password-stdin", "--scope", 'a"b'), "not a valid scope"),
    ],
)
def test_bad_account_input_is_refused_clearly(
    db_url: str, args: tuple[str, ...], message: str
) -> None:
    short = {"the password is empty": "\n", "has 8 characters": "password\n"}
    stdin = next((v for k, v in short.items() if k in message), "a long enough password\n")
    result = run(*args, env={"LEDGER_DATABASE_URL": db_url}, stdin=stdin)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_rotate_adds_a_current_key(db_url: str, pool: ConnectionPool) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    first = run("keys", "rotate", env=env)
    second = run("keys", "rotate", env=env)
    assert first.returncode == 0, first.stderr
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT kid, retired_at IS NULL FROM signing_keys ORDER BY created_at"
        ).fetchall()
    assert [current for _, current in rows] == [False, True]
    assert rows[-1][0] in second.stdout


def test_sweep_once_records_the_expiries_that_are_due(db_url: str, pool: ConnectionPool) -> None:
    started = session.start(
        user="ada", client_id="spa", scope=(), refresh_token_hash="ab" * 32,
        ip=None, user_agent=None, now=T0,
    )  # fmt: skip
    with pool.connection() as conn, conn.transaction():
        EventStore(pool).append(Stream("session:s-1", "session"), 0, [started], conn=conn)
        save_session(conn, session.evolve(None, "s-1", started))
    env = {"LEDGER_DATABASE_URL": db_url}
    first, second = run("sweep", "--once", env=env), run("sweep", "--once", env=env)
    assert (first.returncode, first.stdout) == (0, "1 session ended\n"), first.stderr
    assert second.stdout == "0 sessions ended\n"
    ended = EventStore(pool).read_stream("session:s-1")[-1]
    assert (ended.type, ended.data) == ("SessionEnded", {"reason": "idle_timeout"})
    assert ended.occurred_at == T0 + Policy().idle_timeout


def test_users_list_and_unlock(db_url: str, pool: ConnectionPool) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    for name, scopes in (("ada", ("--scope", "profile", "--scope", "audit")), ("bob", ())):
        added = run("users", "add", name, "--password-stdin", *scopes, env=env,
                    stdin="a long enough password\n")  # fmt: skip
        assert added.returncode == 0, added.stderr
    store, info = EventStore(pool), RequestInfo("r-1", "192.0.2.9", "test")
    for _ in range(5):  # locked now, by the real clock the command reads
        with pool.connection() as conn, conn.transaction():
            state = load_principal(conn, "ada", for_update=True)
            failure = Failure("wrong_password", info, datetime.now(UTC))
            record_failure(store, conn, state, failure, LockoutPolicy())
    listed = run("users", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    ada, bob = listed.stdout.splitlines()
    assert ada.startswith("ada\tprofile audit\tlocked until ")
    assert bob == "bob\t-"
    unlocked = run("users", "unlock", "ada", env=env)
    assert (unlocked.returncode, unlocked.stdout) == (0, "user ada unlocked\n")
    assert run("users", "list", env=env).stdout.splitlines()[0] == "ada\tprofile audit"
    again = run("users", "unlock", "ada", env=env)
    assert again.stdout == "user ada was not locked\n"
    assert [r.type for r in store.read_stream("principal:ada")][-2:] == [
        "PrincipalLocked",
        "PrincipalUnlocked",
    ]
    with pool.connection() as conn:  # the next login is judged afresh
        assert load_principal(conn, "ada", for_update=False).locked_until is None
    missing = run("users", "unlock", "nobody", env=env)
    assert (missing.returncode, "user 'nobody' does not exist" in missing.stderr) == (1, True)
    disabled = run("users", "disable", "bob", env=env)
    assert disabled.stdout == "user bob disabled; 0 sessions ended\n"
    assert run("users", "list", env=env).stdout.splitlines()[1] == "bob\t-\tdisabled"
    assert run("users", "enable", "bob", env=env).stdout == "user bob enabled\n"
    assert run("users", "list", env=env).stdout.splitlines()[1] == "bob\t-"


def test_clients_list(db_url: str) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    web = ("clients", "add", "web", "--redirect-uri", "https://app.test/cb", "--require-dpop")
    assert run(*web, env=env).returncode == 0
    assert run("clients", "add", "pw", "--grant", "password", env=env).returncode == 0
    listed = run("clients", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "pw\tpublic\tpassword\t-\t-",
        "web\tpublic\tauthorization_code,refresh_token\t-\thttps://app.test/cb\tdpop-required",
    ]


@pytest.mark.slow
def test_a_command_on_a_directory_without_a_database_refuses_to_make_one(
    embedded_dir: Path,
) -> None:
    env = {"LEDGER_DATA_DIR": str(embedded_dir)}
    for command in (("export", "--format", "jsonl", "-o", str(embedded_dir.parent / "x")),
                    ("verify",), ("users", "list"), ("db", "url")):  # fmt: skip
        refused = run(*command, env=env)
        assert refused.returncode == 2, command
        assert f"there is no database in {embedded_dir}" in refused.stderr
        assert "session-ledger db init" in refused.stderr
    assert not embedded_dir.exists()
    assert run("db", "init", env=env).returncode == 0
    again = run("db", "init", env=env)
    assert again.stdout == "schema is up to date\n"
    verified = run("verify", env=env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == f"session-ledger: embedded PostgreSQL in {embedded_dir}\n"


def test_the_default_data_directory_is_the_users_not_the_working_directorys() -> None:
    assert DEFAULT_DATA_DIR.is_absolute()
    assert Path(platformdirs.user_data_dir("session-ledger")) / "pgdata" == DEFAULT_DATA_DIR


def test_clients_remove(db_url: str) -> None:
    env = {"LEDGER_DATABASE_URL": db_url}
    assert run("clients", "add", "pw", "--grant", "password", env=env).returncode == 0
    removed = run("clients", "remove", "pw", env=env)
    assert (removed.returncode, removed.stdout) == (0, "client pw removed; 0 sessions ended\n")
    assert run("clients", "list", env=env).stdout == ""
    again = run("clients", "remove", "pw", env=env)
    assert again.returncode == 1
    assert "client 'pw' does not exist" in again.stderr
