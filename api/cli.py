from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from api.accounts import GRANTS, AccountError, Accounts
from api.cli_support import database_url as _database_url
from api.cli_support import failures_exit_2 as _failures_exit_2
from api.cli_support import parse_time
from api.history_cli import history
from api.keys import Sealer, rotate_keys
from api.progress import ProgressBar
from api.settings import Settings
from ledger.db import RUNTIME_ROLE, check_role, open_pool
from ledger.embedded import stop_embedded
from ledger.errors import InvalidImport, SerializationError
from ledger.export import ExportFilter, ExportFormat, export_events, import_jsonl
from ledger.store import EventStore

app = typer.Typer(
    help="session-ledger: an event-sourced session service on PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="The database: create the schema, show or stop the embedded server.")
app.add_typer(db_app, name="db")
users_app = typer.Typer(help="Users who log in.", no_args_is_help=True)
app.add_typer(users_app, name="users")
clients_app = typer.Typer(help="OAuth clients.", no_args_is_help=True)
app.add_typer(clients_app, name="clients")
keys_app = typer.Typer(help="Access-token signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def main() -> None:
    app()


app.add_typer(history)


@db_app.command("init")
def db_init() -> None:
    """Create or update the schema (idempotent)."""
    with _failures_exit_2():
        _database_url(Settings.from_env())
    typer.echo("schema is up to date")


@db_app.command("url")
def db_url() -> None:
    """Print the database URL in use; starts the embedded server and leaves it running if needed."""
    with _failures_exit_2():
        settings = Settings.from_env()
        url = _database_url(settings, keep_embedded_running=True)
    typer.echo(url)
    if settings.database_url is None:
        typer.echo(
            f"embedded PostgreSQL in {settings.data_dir} is running; "
            "stop it with: session-ledger db stop",
            err=True,
        )


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server (no effect when LEDGER_DATABASE_URL is set)."""
    with _failures_exit_2():
        settings = Settings.from_env()
        if settings.database_url is not None:
            typer.echo("LEDGER_DATABASE_URL is set: there is no embedded server to stop", err=True)
            return
        stopped = stop_embedded(settings.data_dir)
    typer.echo("stopped" if stopped else f"no embedded server is running in {settings.data_dir}")


@app.command()
def verify() -> None:
    """Recompute every stream's hash chain. Exit 0 when all hold, 1 listing each broken link."""
    with _failures_exit_2():
        url = _database_url(Settings.from_env())
        with open_pool(url, max_size=1) as pool:
            broken = EventStore(pool).verify()
    for link in broken:
        typer.echo(f"broken: {link}")
    if broken:
        typer.echo(f"{len(broken)} stream(s) have a broken hash chain", err=True)
        raise typer.Exit(1)
    typer.echo("every hash chain holds")


@app.command()
def export(
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FILE", help="The file to write.")
    ],
    format_: Annotated[ExportFormat, typer.Option("--format", help="The file format.")],
    since: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_time,
            metavar="TIME",
            help="Only events that occurred at or after TIME (ISO 8601; naive means UTC).",
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_time, metavar="TIME", help="Only events that occurred before TIME."
        ),
    ] = None,
    type_: Annotated[
        list[str] | None,
        typer.Option("--type", metavar="TYPE", help="Only events of this type; repeat for more."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite FILE if it exists.")] = False,
) -> None:
    """Write the events to a JSONL, CSV or Parquet file, from one consistent snapshot."""
    if output.exists() and not force:
        typer.echo(f"session-ledger: {output} exists; pass --force to overwrite it", err=True)
        raise typer.Exit(1)
    where = ExportFilter(since, until, tuple(type_ or ()))
    with _failures_exit_2():
        url = _database_url(Settings.from_env())
        with open_pool(url, max_size=1) as pool:
            bar = ProgressBar("export")
            try:
                count = export_events(pool, output, format_, where, progress=bar, overwrite=force)
            except OSError as e:
                typer.echo(f"session-ledger: cannot write {output}: {e}", err=True)
                raise typer.Exit(1) from None
            finally:
                bar.finish()
    typer.echo(f"exported {count} events to {output}")


@app.command("import")
def import_(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A JSONL file written by export.", exists=True, dir_okay=False
        ),
    ],
    append: Annotated[
        bool, typer.Option("--append", help="Import into a ledger that already holds events.")
    ] = False,
) -> None:
    """Load an exported JSONL file, keeping versions and hash chains; writes nothing on failure."""
    with _failures_exit_2():
        url = _database_url(Settings.from_env())
        with open_pool(url, max_size=1) as pool:
            try:
                count = import_jsonl(pool, file, append=append)
            except (InvalidImport, SerializationError) as e:
                typer.echo(f"session-ledger: {file}: {e}; nothing was imported", err=True)
                raise typer.Exit(1) from None
    typer.echo(f"imported {count} events from {file}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    demo: Annotated[
        bool, typer.Option(help="Create a demo user and client if absent; print a walk-through.")
    ] = False,
) -> None:
    """Run the HTTP API (on the embedded PostgreSQL unless LEDGER_DATABASE_URL is set); it acts
    as the least-privilege role session_ledger_runtime."""
    base = f"http://{_url_host(host)}:{port}"  # what a client types: an IPv6 host in brackets
    with _failures_exit_2():
        settings = Settings.from_env()
        url = _database_url(settings)
        check_role(url, RUNTIME_ROLE)  # the workers act as it; say why now if they cannot
        if demo:
            with open_pool(url, max_size=1) as pool:
                _create_demo_accounts(Accounts(pool))
            typer.echo(demo_walkthrough(base))
    # Workers are separate processes: they find the database (embedded or not) in the environment.
    os.environ["LEDGER_DATABASE_URL"] = url
    os.environ.setdefault("LEDGER_ISSUER", base)
    if demo:
        # The demo page is served from where we listen, so its origin may use the browser mode.
        os.environ["LEDGER_DEMO"] = "1"
        os.environ.setdefault("LEDGER_ALLOWED_ORIGINS", base)
        typer.echo(f"demo page: {base}/demo", err=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would kill this process before
    # the embedded PostgreSQL is stopped at exit; exiting normally lets that happen.
    signal.signal(signal.SIGTERM, _exit_normally)
    typer.echo(f"session-ledger listening on {base}", err=True)
    uvicorn.run(
        "api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http="api.transport:NoDelayH11Protocol",
        log_level="info",
        # A worker starting on a busy machine (imports, key load, pool) can take longer than
        # uvicorn's 5 s before it answers the supervisor's first ping; it is not hung.
        timeout_worker_healthcheck=30,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _exit_normally(signum: int, frame: object) -> None:
    raise SystemExit(0)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user name.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="A scope the user holds; repeat for more.")
    ] = None,
) -> None:
    """Create a user; the password is prompted for unless --password-stdin is given."""
    password = _read_secret("password", from_stdin=password_stdin)
    with _failures_exit_2(), _accounts() as accounts:
        accounts.add_user(name, password, tuple(scope or ()))
    typer.echo(f"user {name} created")


@clients_app.command("add")
def clients_add(
    client_id: Annotated[str, typer.Argument(help="The client id.")],
    confidential: Annotated[
        bool, typer.Option("--confidential", help="The client authenticates with a secret.")
    ] = False,
    secret_stdin: Annotated[
        bool, typer.Option("--secret-stdin", help="Read the secret from standard input.")
    ] = False,
    grant: Annotated[
        list[str] | None,
        typer.Option("--grant", help="A grant type the client may use; repeat for more."),
    ] = None,
) -> None:
    """Create a client. A confidential one without --secret-stdin gets a generated secret,
    printed once. Grants default to password and refresh_token."""
    confidential = confidential or secret_stdin
    generated = confidential and not secret_stdin
    secret = None
    if secret_stdin:
        secret = _read_secret("secret", from_stdin=True)
    elif generated:
        secret = secrets.token_urlsafe(32)
    with _failures_exit_2(), _accounts() as accounts:
        accounts.add_client(client_id, secret, tuple(grant or GRANTS))
    kind = "confidential" if confidential else "public"
    typer.echo(f"{kind} client {client_id} created")
    if generated:
        typer.echo(f"client secret (shown once, store it now): {secret}")


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Start signing with a new key; the old one stays in the JWKS until its tokens expire."""
    with _failures_exit_2():
        settings = Settings.from_env()
        url = _database_url(settings)
        with open_pool(url, max_size=1) as pool:
            key = rotate_keys(pool, Sealer(settings.key_encryption_key), datetime.now(UTC))
    typer.echo(f"new signing key {key.kid}; servers pick it up within a minute")


@contextmanager
def _accounts() -> Iterator[Accounts]:
    url = _database_url(Settings.from_env())
    with open_pool(url, max_size=1) as pool:
        try:
            yield Accounts(pool)
        except AccountError as e:
            typer.echo(f"session-ledger: {e}", err=True)
            raise typer.Exit(1) from None


def _read_secret(what: str, *, from_stdin: bool) -> str:
    if from_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        value = typer.prompt(f"{what.capitalize()}", hide_input=True, confirmation_prompt=True)
    if not value:
        typer.echo(f"session-ledger: the {what} is empty", err=True)
        raise typer.Exit(2)
    return value


DEMO_USER, DEMO_PASSWORD, DEMO_CLIENT = "demo", "demo-password", "demo-spa"


def _create_demo_accounts(accounts: Accounts) -> None:
    if accounts.user(DEMO_USER) is None:
        accounts.add_user(DEMO_USER, DEMO_PASSWORD, ("profile",))
    if accounts.client(DEMO_CLIENT) is None:
        accounts.add_client(DEMO_CLIENT, None, GRANTS)


def demo_walkthrough(base: str) -> str:
    """Curl commands that log in, call a protected endpoint, refresh, and replay a spent token."""
    return f"""Demo user {DEMO_USER!r} (password {DEMO_PASSWORD!r}), public client {DEMO_CLIENT!r}.

# 1. Log in; keep the tokens:
curl -s {base}/oauth/token -d grant_type=password -d client_id={DEMO_CLIENT} \\
     -d username={DEMO_USER} -d password={DEMO_PASSWORD} | tee /tmp/tokens.json
ACCESS=$(python3 -c 'import json; print(json.load(open("/tmp/tokens.json"))["access_token"])')
REFRESH=$(python3 -c 'import json; print(json.load(open("/tmp/tokens.json"))["refresh_token"])')

# 2. List your sessions with the access token:
curl -s {base}/sessions -H "Authorization: Bearer $ACCESS"

# 3. Refresh (rotates the refresh token; the old one is now spent):
curl -s {base}/oauth/token -d grant_type=refresh_token -d client_id={DEMO_CLIENT} \\
     -d refresh_token="$REFRESH"

# 4. Within 10 seconds (LEDGER_REFRESH_GRACE) the old token is taken for a retry and gets the
#    same successor; after that, replaying it is theft and revokes the session:
sleep 11; curl -s {base}/oauth/token -d grant_type=refresh_token -d client_id={DEMO_CLIENT} \\
     -d refresh_token="$REFRESH"
"""
