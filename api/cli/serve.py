"""`session-ledger serve`: the HTTP API in uvicorn workers, and the demo accounts."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from typing import Annotated

import typer
import uvicorn

from api.accounts import DEFAULT_GRANTS, Accounts
from api.cli.support import failures_exit_2, prepare_database, service_url
from api.http.transport import log_config
from api.settings import Settings
from ledger.db import RUNTIME_ROLE, check_role, open_pool

serve_app = typer.Typer()
GRACEFUL_SHUTDOWN_SECONDS = 5


@serve_app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    demo: Annotated[
        bool, typer.Option(help="Create a demo user and client if absent; print a walk-through.")
    ] = False,
    demo_on_shared_database: Annotated[
        bool,
        typer.Option(
            help="Allow --demo on LEDGER_DATABASE_URL: its well-known demo password stays there."
        ),
    ] = False,
) -> None:
    """Run the HTTP API (on the embedded PostgreSQL unless LEDGER_DATABASE_URL is set); it acts
    as the least-privilege role session_ledger_runtime, and on the embedded server logs in as
    session_ledger_app, which holds only that role."""
    base = f"http://{_url_host(host)}:{port}"  # what a client types: an IPv6 host in brackets
    with failures_exit_2():
        settings = Settings.from_env()
        if demo and settings.database_url is not None:
            if not demo_on_shared_database:
                typer.echo(
                    "session-ledger: --demo creates the user demo with a published password;"
                    " on LEDGER_DATABASE_URL it would stay there for anyone to use. Run the demo"
                    " on the embedded database, or add --demo-on-shared-database.",
                    err=True,
                )
                raise typer.Exit(2)
            typer.echo(
                f"warning: demo user {DEMO_USER!r} with the password {DEMO_PASSWORD!r} is being"
                " created on LEDGER_DATABASE_URL; remove it when the demo is over",
                err=True,
            )
        owner_url = prepare_database(settings)
        url = service_url(settings, owner_url)
        check_role(url, RUNTIME_ROLE)  # the workers act as it; say why now if they cannot
        if demo:
            with open_pool(owner_url, max_size=1) as pool:  # accounts are the owner's to write
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
    _share_metrics_dir(workers)
    uvicorn.run(
        "api.http.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http="api.http.transport:NoDelayHttpToolsProtocol",
        loop="uvloop",
        log_level="info",
        access_log=settings.access_log,
        log_config=log_config(),
        # The app reads X-Forwarded-For itself, from LEDGER_TRUSTED_PROXIES only; uvicorn's own
        # reading would trust a proxy on 127.0.0.1, so any local process could pick its address.
        proxy_headers=False,
        # A worker starting on a busy machine (imports, key load, pool) can take longer than
        # uvicorn's 5 s before it answers the supervisor's first ping; it is not hung.
        timeout_worker_healthcheck=30,
        # Session-end event streams never finish on their own: at shutdown they are cut after
        # this long, and their readers resume from their last event's id elsewhere.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def _share_metrics_dir(workers: int) -> None:
    """Make a private directory where the workers' latency samples meet, so /metrics sums them."""
    if workers == 1:
        return  # one process: nothing to add up
    # mkdtemp makes it mode 0700: no other user may read or plant samples. A worker that uvicorn
    # restarts writes new files under its new pid; the dead one's counts stay summed, as counters
    # must (mark_process_dead only concerns live gauges, which we do not keep).
    path = tempfile.mkdtemp(prefix="session-ledger-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # SIGTERM exits normally, above


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _exit_normally(signum: int, frame: object) -> None:
    raise SystemExit(0)


DEMO_USER, DEMO_PASSWORD, DEMO_CLIENT = "demo", "demo-password", "demo-spa"


def _create_demo_accounts(accounts: Accounts) -> None:
    if accounts.user(DEMO_USER) is None:
        accounts.add_user(DEMO_USER, DEMO_PASSWORD, ("profile",))
    if accounts.client(DEMO_CLIENT) is None:
        accounts.add_client(DEMO_CLIENT, None, DEFAULT_GRANTS)


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
