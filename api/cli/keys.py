"""`session-ledger keys`: the access-token signing keys."""

from __future__ import annotations

from datetime import UTC, datetime

import typer

from api.cli.support import failures_exit_2, prepare_database
from api.keys import Sealer, rotate_keys
from api.settings import Settings
from ledger.db import open_pool

keys_app = typer.Typer(help="Access-token signing keys.", no_args_is_help=True)


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Start signing with a new key; the old one stays in the JWKS until its tokens expire."""
    with failures_exit_2():
        settings = Settings.from_env()
        url = prepare_database(settings)
        with open_pool(url, max_size=1) as pool:
            key = rotate_keys(pool, Sealer(settings.key_encryption_key), datetime.now(UTC))
    typer.echo(f"new signing key {key.kid}; running servers sign with it at once")
