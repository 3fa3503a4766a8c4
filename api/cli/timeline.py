"""`session-ledger history`: one session's or one user's events as a timeline, for an analyst,
with the hash chains of what it shows checked."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from api.cli.support import failures_exit_2, parse_time, prepare_database
from api.settings import Settings
from ledger.db import open_pool
from ledger.records import START, RecordedEvent
from ledger.serialization import JsonValue, format_timestamp
from ledger.store import EventStore
from projections.sql.inline import user_sessions
from projections.streams import principal_stream_id, session_stream_id

timeline_app = typer.Typer()
_PAGE = 1000


@timeline_app.command("history")
def history(
    session: Annotated[str | None, typer.Option(help="One session's events.")] = None,
    user: Annotated[
        str | None, typer.Option(help="A user's events: failed logins, account changes, sessions.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(metavar="TIME", help="Only events at or after TIME (ISO 8601).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document instead of a table.")
    ] = False,
) -> None:
    """A timeline: time, event, address, user agent, refresh generation and why a session
    ended, oldest first; and whether the hash chains of the streams shown hold (exit 1 when
    one does not)."""
    if (session is None) == (user is None):
        raise typer.BadParameter("give exactly one of --session and --user")
    moment = parse_time(since) if since else None
    with failures_exit_2():
        url = prepare_database(Settings.from_env())
        with open_pool(url, max_size=1) as pool:
            if session is not None:
                streams = [session_stream_id(session)]
            else:
                assert user is not None
                with pool.connection() as conn:
                    owned = [s.session_id for s in user_sessions(conn, user, 100_000)]
                streams = [principal_stream_id(user), *map(session_stream_id, owned)]
            store = EventStore(pool)
            events = _events(store, streams, moment)
            checked = store.check_chains(streams)
    chain: dict[str, JsonValue] = {
        "holds": not checked.broken,
        "events": checked.events,
        "streams": checked.streams,
        "broken": [str(link) for link in checked.broken],
    }
    rows = [_row(e) for e in events]
    if as_json:
        typer.echo(json.dumps({"events": rows, "chain": chain}, indent=2))
    else:
        _print(rows, checked.events, checked.streams, [str(link) for link in checked.broken])
    if checked.broken:
        raise typer.Exit(1)


def _events(store: EventStore, streams: list[str], since: datetime | None) -> list[RecordedEvent]:
    found, after = [], START
    while page := store.read_filtered(after, _PAGE, stream_ids=streams, occurred_from=since):
        found += page
        after = page[-1].checkpoint
    return sorted(found, key=lambda e: (e.occurred_at, e.position))


def _row(recorded: RecordedEvent) -> dict[str, JsonValue]:
    data, meta = recorded.data, recorded.metadata
    return {
        "position": recorded.position,
        "occurred_at": format_timestamp(recorded.occurred_at),
        "stream_id": recorded.stream_id,
        "type": recorded.type,
        "ip": data.get("ip", meta.get("ip")),
        "user_agent": data.get("user_agent", meta.get("user_agent")),
        "generation": data.get("generation"),
        "reason": data.get("reason"),
        "data": data,
    }


def _print(rows: list[dict[str, JsonValue]], events: int, streams: int, broken: list[str]) -> None:
    table = Table("time (UTC)", "stream", "event", "address", "user agent", "gen", "reason")
    for row in rows:
        cells = (row["occurred_at"], row["stream_id"], row["type"], row["ip"], row["user_agent"],
                 row["generation"], row["reason"])  # fmt: skip
        table.add_row(*("" if c is None else str(c) for c in cells))
    # A terminal's width; piped into a file or another program, wide enough not to break cells.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    if not broken:  # plain lines, never wrapped: scripts and eyes alike look for them
        typer.echo(f"hash chains hold: {events} event(s) in {streams} stream(s)")
    for link in broken:
        typer.echo(f"BROKEN: {link}")
