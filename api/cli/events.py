"""The event log as a whole: verify its hash chains, export it, import an export."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from api.cli.progress import ProgressBar
from api.cli.support import failures_exit_2, parse_time, prepare_database
from api.settings import Settings
from ledger.db import open_pool
from ledger.errors import InvalidImport, LedgerError, SerializationError
from ledger.export import ExportFilter, ExportFormat, export_events, import_jsonl
from ledger.store import EventStore
from projections.sql.catalog import PROJECTIONS
from projections.sql.rebuild import rebuild as rebuild_projection

events_app = typer.Typer()


@events_app.command()
def verify() -> None:
    """Recompute every stream's hash chain. Exit 0 when all hold, 1 listing each broken link."""
    with failures_exit_2():
        url = prepare_database(Settings.from_env())
        with open_pool(url, max_size=1) as pool:
            checked = EventStore(pool).check_chains()
    for link in checked.broken:
        typer.echo(f"broken: {link}")
    counted = f"{checked.events} event(s) in {checked.streams} stream(s) checked"
    if checked.broken:
        typer.echo(f"{counted}; {len(checked.broken)} have a broken hash chain", err=True)
        raise typer.Exit(1)
    typer.echo(f"every hash chain holds: {counted}")


@events_app.command()
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
    with failures_exit_2():
        url = prepare_database(Settings.from_env())
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


@events_app.command("import")
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
    """Load an exported JSONL file, keeping versions and hash chains; writes nothing on failure.
    Then rebuild every projection from the events, so that sessions and summaries match them.
    Accounts (users, clients) and keys are not in an export: create them again."""
    with failures_exit_2():
        url = prepare_database(Settings.from_env())
        with open_pool(url, max_size=2) as pool:
            try:
                count = import_jsonl(pool, file, append=append)
            except (InvalidImport, SerializationError) as e:
                typer.echo(f"session-ledger: {file}: {e}; nothing was imported", err=True)
                raise typer.Exit(1) from None
            typer.echo(f"imported {count} events from {file}")
            store = EventStore(pool)
            for projection in PROJECTIONS.values():
                try:
                    rebuild_projection(url, store, projection)
                except (ValueError, LedgerError) as e:  # events no projection can read
                    typer.echo(
                        f"session-ledger: the events are imported, but rebuilding"
                        f" {projection.name} failed: {e}; run `session-ledger rebuild` once"
                        " the cause is fixed",
                        err=True,
                    )
                    raise typer.Exit(1) from None
            typer.echo(f"rebuilt the projections: {', '.join(PROJECTIONS)}")
    typer.echo(
        "accounts (users, clients) and keys are not part of an export: create them on this"
        " database; tokens signed by the old server's keys do not verify here",
        err=True,
    )
