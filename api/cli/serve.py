"""`session-ledger serve`: the HTTP API in uvicorn workers, and the demo accounts."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import tempfile
from datetime import timedelta
from typing import Annotated

import typer
import uvicorn

from api.accounts import AUTHORIZATION_CODE, Accounts
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
        owner_url = prepare_database(settings, create=True)
        url = service_url(settings, owner_url)
        check_role(url, RUNTIME_ROLE)  # the workers act as it; say why now if they cannot
        if demo:
            with open_pool(owner_url, max_size=1) as pool:  # accounts are the owner's to write
                _create_demo_accounts(Accounts(pool), base)
            typer.echo(demo_walkthrough(base, settings.policy.refresh_grace))
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


DEMO_GRANTS = (AUTHORIZATION_CODE, "refresh_token", "password")
"""Both ways in for the demo page: the server's login page, and its own form."""


def _create_demo_accounts(accounts: Accounts, base: str) -> None:
    if accounts.user(DEMO_USER) is None:
        accounts.add_user(DEMO_USER, DEMO_PASSWORD, ("profile",))
    redirect_uris = (f"{base}/demo",)
    if accounts.client(DEMO_CLIENT) is None:
        accounts.add_client(DEMO_CLIENT, None, DEMO_GRANTS, redirect_uris=redirect_uris)
    else:  # made by an earlier version, or for another address
        accounts.widen_client(DEMO_CLIENT, DEMO_GRANTS, redirect_uris)


def demo_walkthrough(base: str, grace: timedelta = timedelta(seconds=10)) -> str:
    """Curl commands that log in, call a protected endpoint, refresh, and replay a spent token
    (after the refresh `grace`); then a script for the authorization code with PKCE."""
    seconds = math.ceil(grace.total_seconds())
    return f"""Demo user {DEMO_USER!r} (password {DEMO_PASSWORD!r}), public client {DEMO_CLIENT!r}.

# 1. Log in; keep the tokens in a file only you can read (mktemp makes it so):
TOKENS=$(mktemp)
curl -s {base}/oauth/token -d grant_type=password -d client_id={DEMO_CLIENT} \\
     -d username={DEMO_USER} -d password={DEMO_PASSWORD} > "$TOKENS"
READ='import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])'
ACCESS=$(python3 -c "$READ" "$TOKENS" access_token)
REFRESH=$(python3 -c "$READ" "$TOKENS" refresh_token)
rm "$TOKENS"

# 2. List your sessions with the access token:
curl -s {base}/sessions -H "Authorization: Bearer $ACCESS"

# 3. Refresh (rotates the refresh token; the old one is now spent):
curl -s {base}/oauth/token -d grant_type=refresh_token -d client_id={DEMO_CLIENT} \\
     -d refresh_token="$REFRESH"

# 4. Within {seconds} seconds (LEDGER_REFRESH_GRACE) the old token is taken for a retry and gets
#    the same successor; after that, replaying it is theft and revokes the session:
sleep {seconds + 1}
curl -s {base}/oauth/token -d grant_type=refresh_token -d client_id={DEMO_CLIENT} \\
     -d refresh_token="$REFRESH"

# 5. The authorization code with PKCE: the app sends the user to this server's login page and
#    never sees the password. A browser does the middle part; here Python's standard library:
python3 - <<'PY'
import base64, hashlib, json, re, secrets, urllib.error, urllib.parse, urllib.request
BASE, CLIENT, BACK = "{base}", "{DEMO_CLIENT}", "{base}/demo"
verifier = secrets.token_urlsafe(48)  # the app keeps this; only its hash travels
challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
query = urllib.parse.urlencode(dict(response_type="code", client_id=CLIENT, redirect_uri=BACK,
    code_challenge=challenge.decode(), code_challenge_method="S256", state="s1"))
page = urllib.request.urlopen(f"{{BASE}}/oauth/authorize?{{query}}")  # the login page
cookie = page.headers["Set-Cookie"].split(";")[0]  # its CSRF cookie, as a browser keeps it
form = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.read().decode()))
form.update(username="{DEMO_USER}", password="{DEMO_PASSWORD}")  # what the user types in
class Keep(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args): return None  # the answer is the redirect itself
try:
    urllib.request.build_opener(Keep).open(urllib.request.Request(f"{{BASE}}/oauth/authorize",
        urllib.parse.urlencode(form).encode(), {{"Cookie": cookie}}))
except urllib.error.HTTPError as answer:  # 303 to the app, with the code
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(answer.headers["Location"]).query)["code"][0]
tokens = urllib.request.urlopen(f"{{BASE}}/oauth/token", urllib.parse.urlencode(dict(
    grant_type="authorization_code", client_id=CLIENT, code=code, redirect_uri=BACK,
    code_verifier=verifier)).encode())
print(json.dumps(json.load(tokens), indent=2))
PY
"""
