from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
import uvicorn

from api.app import create_app
from api.settings import Settings, SettingsError
from ledger.db import apply_schema, open_pool
from ledger.embedded import start_embedded, stop_embedded
from ledger.errors import LedgerError
from ledger.store import EventStore

app = typer.Typer(
    help="session-ledger: an event-sourced session service on PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="The database: create the schema, show or stop the embedded server.")
app.add_typer(db_app, name="db")


def main() -> None:
    app()


@contextmanager
def _failures_exit_2() -> Iterator[None]:
    """Report configuration and database failures as one line on stderr, exit status 2."""
    try:
        yield
    except (SettingsError, LedgerError) as e:
        typer.echo(f"session-ledger: {e}", err=True)
        raise typer.Exit(2) from None


def _database_url(settings: Settings, *, keep_embedded_running: bool = False) -> str:
    """LEDGER_DATABASE_URL or the embedded server's URL (started if needed); schema applied."""
    url = settings.database_url or start_embedded(
        settings.data_dir, keep_running=keep_embedded_running
    )
    apply_schema(url)
    return url


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
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the HTTP API (on the embedded PostgreSQL unless LEDGER_DATABASE_URL is set)."""
    with _failures_exit_2():
        url = _database_url(Settings.from_env())
    typer.echo(f"session-ledger listening on http://{host}:{port}", err=True)
    uvicorn.run(create_app(url), host=host, port=port, log_level="info")
