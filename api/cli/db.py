"""`session-ledger db`: create the schema, show or stop the embedded server."""

from __future__ import annotations

import typer

from api.cli.support import failures_exit_2, prepare_database, service_url
from api.settings import Settings
from ledger.embedded import stop_embedded

db_app = typer.Typer(help="The database: create the schema, show or stop the embedded server.")


@db_app.command("init")
def db_init() -> None:
    """Create or update the schema (idempotent); on the embedded server also the login role
    session_ledger_app that `serve` uses."""
    with failures_exit_2():
        settings = Settings.from_env()
        service_url(settings, prepare_database(settings))
    typer.echo("schema is up to date")


@db_app.command("url")
def db_url() -> None:
    """Print the database URL in use; starts the embedded server and leaves it running if needed."""
    with failures_exit_2():
        settings = Settings.from_env()
        url = prepare_database(settings, keep_embedded_running=True)
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
    with failures_exit_2():
        settings = Settings.from_env()
        if settings.database_url is not None:
            typer.echo("LEDGER_DATABASE_URL is set: there is no embedded server to stop", err=True)
            return
        stopped = stop_embedded(settings.data_dir)
    typer.echo("stopped" if stopped else f"no embedded server is running in {settings.data_dir}")
