"""`session-ledger db`: create the schema, show or stop the embedded server."""

from __future__ import annotations

import typer

from api.cli.support import failures_exit_2, prepare_database, service_url
from api.settings import Settings
from ledger.db import schema_exists
from ledger.embedded import is_embedded_database, stop_embedded

db_app = typer.Typer(help="The database: create the schema, show or stop the embedded server.")


@db_app.command("init")
def db_init() -> None:
    """Create the database (embedded) or the schema, or update it (idempotent); on the embedded
    server also the login role session_ledger_app that `serve` uses."""
    with failures_exit_2():
        settings = Settings.from_env()
        if settings.database_url:
            new = not schema_exists(settings.database_url)
        else:
            new = not is_embedded_database(settings.data_dir)
        service_url(settings, prepare_database(settings, create=True))
    typer.echo("created the schema in a new database" if new else "schema is up to date")


@db_app.command("url")
def db_url() -> None:
    """Print the database URL in use; starts the embedded server and leaves it running if needed."""
    with failures_exit_2():
        settings = Settings.from_env()
        url = prepare_database(settings, keep_embedded_running=True)
    typer.echo(url)
    if settings.database_url is None:
        typer.echo("it keeps running; stop it with: session-ledger db stop", err=True)


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
