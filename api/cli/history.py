"""Commands over the ledger's history: catch-up projections, rebuilds and replays."""

from __future__ import annotations

import signal
import threading
from contextlib import suppress
from datetime import UTC, datetime
from typing import Annotated

import typer
from psycopg_pool import ConnectionPool

from api.cli.progress import ProgressBar
from api.cli.support import failures_exit_2, parse_time, prepare_database, sessions_count
from api.settings import Settings
from ledger.db import open_pool
from ledger.store import EventStore
from projections.replay import Change, PointInTime, as_of, parse_policy_changes, what_if
from projections.sql.catalog import CATCH_UP, PROJECTIONS
from projections.sql.inline import user_sessions
from projections.sql.rebuild import rebuild as rebuild_projection
from projections.sql.runner import Runner, lag
from projections.sql.sweeper import ExpirySweeper
from projections.streams import session_stream_id

history = typer.Typer()


@history.command()
def project(
    once: Annotated[bool, typer.Option(help="Catch up once and exit.")] = False,
) -> None:
    """Keep the catch-up projections current (user_summary, hourly_stats, alerts)."""
    with failures_exit_2():
        url = prepare_database(Settings.from_env())
        with open_pool(url, max_size=2) as pool:
            runner, store = Runner(url, pool), EventStore(pool)
            if once:
                applied = runner.run_once()
                with pool.connection() as conn:
                    for projection in CATCH_UP:
                        behind = lag(store, conn, projection, datetime.now(UTC))
                        done = applied.get(projection.name)
                        status = "busy in another runner" if done is None else f"{done:,} applied"
                        typer.echo(f"{projection.name}: {status}; {behind.events:,} behind")
                return
            # SIGINT too, whatever it was: a shell starts a background job (`project &`) with
            # SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
            for stop in (signal.SIGTERM, signal.SIGINT):
                signal.signal(stop, lambda *_: runner.stop())
            typer.echo("projecting; Ctrl-C stops", err=True)
            worker = threading.Thread(target=runner.run, daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(timeout=0.5)


@history.command()
def sweep(
    once: Annotated[bool, typer.Option(help="Record the expiries due now and exit.")] = False,
) -> None:
    """Record every idle and absolute expiry as its deadline passes (SessionEnded, dated at the
    deadline), every LEDGER_EXPIRY_SWEEP_INTERVAL (1 s when it is 0, which keeps `serve` from
    sweeping itself). One sweeper is active at a time across all processes."""
    with failures_exit_2():
        settings = Settings.from_env()
        url = prepare_database(settings)
        with open_pool(url, max_size=1) as pool:
            interval = settings.expiry_sweep_interval.total_seconds() or 1.0
            sweeper = ExpirySweeper(
                pool, clock=lambda: datetime.now(UTC), policy=settings.policy,
                interval_seconds=interval,
            )  # fmt: skip
            if once:
                typer.echo(f"{sessions_count(sweeper.sweep())} ended")
                return
            signal.signal(signal.SIGTERM, lambda *_: sweeper.stopping.set())
            typer.echo(f"sweeping every {interval:g} s; Ctrl-C stops", err=True)
            with suppress(KeyboardInterrupt):
                sweeper.run()


@history.command()
def rebuild(
    name: Annotated[
        str | None, typer.Argument(help=f"One of {', '.join(PROJECTIONS)}; all when omitted.")
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Rebuild beside the live tables; exit 1 listing rows that differ.")
    ] = False,
) -> None:
    """Replay every event into fresh tables and swap them in (or compare, with --check)."""
    if name is not None and name not in PROJECTIONS:
        raise typer.BadParameter(f"unknown projection {name!r}; known: {', '.join(PROJECTIONS)}")
    chosen = [PROJECTIONS[name]] if name else list(PROJECTIONS.values())
    drifted = 0
    with failures_exit_2():
        url = prepare_database(Settings.from_env())
        with open_pool(url, max_size=2) as pool:
            store = EventStore(pool)
            for projection in chosen:
                bar = ProgressBar(projection.name)
                try:
                    drift = rebuild_projection(url, store, projection, check=check, progress=bar)
                except KeyboardInterrupt:
                    bar.finish()
                    typer.echo("interrupted: the live tables are unchanged", err=True)
                    raise typer.Exit(130) from None
                bar.finish()
                for row in drift:
                    typer.echo(f"drift: {row}")
                drifted += len(drift)
                verdict = f"{len(drift)} row(s) differ" if check else "rebuilt"
                typer.echo(f"{projection.name}: {verdict}")
    if drifted:
        raise typer.Exit(1)


@history.command()
def replay(
    as_of_time: Annotated[
        str | None, typer.Option("--as-of", help="Show sessions as they were at TIME.")
    ] = None,
    session: Annotated[str | None, typer.Option(help="One session (with --as-of).")] = None,
    user: Annotated[str | None, typer.Option(help="A user's sessions (with --as-of).")] = None,
    what_if_policy: Annotated[
        str | None,
        typer.Option("--what-if", help="Replay under another policy: idle=30m,absolute=4h."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="With --what-if: sessions started since TIME.")
    ] = None,
) -> None:
    """Point-in-time (--as-of) or what-if (--what-if) replay of session history.

    TIME is ISO 8601 (2026-03-01T14:03Z); without a zone it is UTC.
    """
    if (as_of_time is None) == (what_if_policy is None):
        raise typer.BadParameter("give exactly one of --as-of and --what-if")
    with failures_exit_2():
        settings = Settings.from_env()
        url = prepare_database(settings)
        with open_pool(url, max_size=2) as pool:
            store = EventStore(pool)
            if as_of_time is not None:
                _replay_as_of(store, pool, settings, parse_time(as_of_time), session, user)
            else:
                assert what_if_policy is not None
                _replay_what_if(store, settings, what_if_policy, since)


def _replay_as_of(
    store: EventStore,
    pool: ConnectionPool,
    settings: Settings,
    moment: datetime,
    session_id: str | None,
    user: str | None,
) -> None:
    if (session_id is None) == (user is None):
        raise typer.BadParameter("with --as-of give exactly one of --session and --user")
    if session_id is not None:
        ids = [session_id]
    else:
        assert user is not None
        with pool.connection() as conn:
            ids = [s.session_id for s in user_sessions(conn, user, 10_000)]
    for sid in ids:
        events = [r.event for r in store.read_stream(session_stream_id(sid))]
        view = as_of(sid, events, moment, settings.policy)
        if view.state is None and user is not None:
            continue  # the user's sessions that start later were not there at that moment
        typer.echo(describe(view))


def describe(view: PointInTime) -> str:
    """One line per session: valid or why not, idle time, generation."""
    if view.state is None:
        return f"{view.session_id}: not started at {view.as_of.isoformat()}"
    state = view.state
    reason = f" ({state.end_reason})" if view.status == "ended" else ""
    idle = int(view.idle_for.total_seconds()) if view.idle_for is not None else 0
    return (
        f"{view.session_id}: {view.status}{reason}; user {state.user}; idle {idle}s;"
        f" generation {state.generation}; last activity {state.last_activity.isoformat()}"
    )


def _replay_what_if(store: EventStore, settings: Settings, changes: str, since: str | None) -> None:
    try:
        other = parse_policy_changes(changes, settings.policy)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    report = what_if(
        store.iter_all(), settings.policy, other, since=parse_time(since) if since else None
    )
    typer.echo(
        f"{report.sessions:,} sessions replayed: {len(report.earlier):,} would have ended earlier,"
        f" {len(report.later):,} later"
    )
    now = datetime.now(UTC)
    for label, changes_ in (("earlier", report.earlier), ("later", report.later)):
        for change in changes_:
            typer.echo(change_line(label, change, now))


def change_line(label: str, change: Change, now: datetime) -> str:
    """One session the what-if changes; an actual end still to come is `projected`."""
    actual = "actual" if change.actual.at <= now else "projected"
    return (
        f"{label}: {change.session_id} ({change.user}) {actual} {change.actual.reason} at"
        f" {change.actual.at.isoformat()}, what-if {change.what_if.reason} at"
        f" {change.what_if.at.isoformat()}"
    )
