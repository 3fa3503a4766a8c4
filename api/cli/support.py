"""What every command shares: one-line failures with exit status 2, and the database in use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import typer

from api.settings import Settings, SettingsError
from ledger.db import apply_schema, create_login_role
from ledger.embedded import is_embedded_database, start_embedded
from ledger.errors import LedgerError, NoDatabase


@contextmanager
def failures_exit_2() -> Iterator[None]:
    """Report configuration and database failures as one line on stderr, exit status 2."""
    try:
        yield
    except (SettingsError, LedgerError) as e:
        typer.echo(f"session-ledger: {e}", err=True)
        raise typer.Exit(2) from None


def prepare_database(
    settings: Settings, *, keep_embedded_running: bool = False, create: bool = False
) -> str:
    """LEDGER_DATABASE_URL, or the embedded server's superuser URL after starting it if needed;
    either way with the schema applied. The embedded server's directory is named on stderr.
    Only with `create` (db init, serve) is a new one made there: any other command would
    otherwise work on an empty database by mistake (NoDatabase)."""
    if settings.database_url:
        url = settings.database_url
    else:
        data_dir = settings.data_dir.expanduser().resolve()
        if not create and not is_embedded_database(data_dir):
            raise NoDatabase(
                f"there is no database in {data_dir}: `session-ledger db init` creates one"
                " there, or set LEDGER_DATA_DIR or LEDGER_DATABASE_URL to the one you mean"
            )
        typer.echo(f"session-ledger: embedded PostgreSQL in {data_dir}", err=True)
        url = start_embedded(data_dir, keep_running=keep_embedded_running)
    apply_schema(url)
    return url


def service_url(settings: Settings, url: str) -> str:
    """The URL `serve` logs in with: on the embedded server the login role that holds only the
    runtime role (created if absent); on an external database LEDGER_DATABASE_URL as given."""
    return url if settings.database_url else create_login_role(url)


def sessions_count(count: int) -> str:
    """`1 session`, `2 sessions`."""
    return f"{count:,} session" + ("" if count == 1 else "s")


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date and time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time (2026-03-01T14:03Z)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
