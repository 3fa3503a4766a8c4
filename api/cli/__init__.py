"""The command line: `session-ledger`, one module per command group."""

from __future__ import annotations

import typer

from api.cli.accounts import clients_app, sessions_app, users_app
from api.cli.db import db_app
from api.cli.events import events_app
from api.cli.history import history
from api.cli.keys import keys_app
from api.cli.serve import serve_app
from api.cli.timeline import timeline_app

app = typer.Typer(
    help="session-ledger: an event-sourced session service on PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(clients_app, name="clients")
app.add_typer(sessions_app, name="sessions")
app.add_typer(keys_app, name="keys")
app.add_typer(events_app)
app.add_typer(serve_app)
app.add_typer(history)
app.add_typer(timeline_app)


def main() -> None:
    app()
