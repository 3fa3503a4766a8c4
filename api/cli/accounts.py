"""`session-ledger users` and `session-ledger clients`: the accounts that log in."""

from __future__ import annotations

import secrets
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer

from api.accounts import (
    DEFAULT_GRANTS,
    INTROSPECT_SCOPE,
    SESSIONS_READ_SCOPE,
    AccountError,
    Accounts,
)
from api.cli.support import failures_exit_2, prepare_database, sessions_count
from api.keys import CLIENT_SECRET_KEY_NAME, Sealer, load_server_secret
from api.sessions import RequestInfo
from api.settings import Settings
from api.users import UserChanges
from ledger.db import open_pool
from ledger.serialization import format_timestamp

users_app = typer.Typer(help="Users who log in.", no_args_is_help=True)
clients_app = typer.Typer(help="OAuth clients.", no_args_is_help=True)


PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user name.")],
    password_stdin: PasswordStdin = False,
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="A scope the user holds; repeat for more.")
    ] = None,
) -> None:
    """Create a user; the password is prompted for unless --password-stdin is given. It needs
    at least LEDGER_MIN_PASSWORD_LENGTH characters (12 by default)."""
    password = _read_password(from_stdin=password_stdin)
    with failures_exit_2(), _accounts() as accounts:
        accounts.add_user(name, password, tuple(scope or ()))
    typer.echo(f"user {name} created")


@users_app.command("unlock")
def users_unlock(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Lift a user's lockout after too many failed logins (PrincipalUnlocked)."""
    with failures_exit_2(), _user_changes() as changes:
        unlocked = changes.unlock(name)
    typer.echo(f"user {name} unlocked" if unlocked else f"user {name} was not locked")


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Let a user log in no more and end all their sessions (UserDisabled, then SessionEnded
    user_disabled); the account stays for `users enable`."""
    with failures_exit_2(), _user_changes() as changes:
        ended = changes.disable(name)
    typer.echo(f"user {name} disabled; {sessions_count(ended)} ended")


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Let a disabled user log in again (UserEnabled)."""
    with failures_exit_2(), _user_changes() as changes:
        changes.enable(name)
    typer.echo(f"user {name} enabled")


@users_app.command("list")
def users_list() -> None:
    """Every user: name, scopes, and `disabled` or the lockout in force, if any."""
    now = datetime.now(UTC)
    with failures_exit_2(), _accounts() as accounts:
        rows = accounts.user_listing()
    for name, scopes, disabled, locked_until in rows:
        notes = ["disabled"] if disabled else []
        if locked_until is not None and locked_until > now:
            notes.append(f"locked until {format_timestamp(locked_until)}")
        typer.echo("\t".join((name, " ".join(scopes) or "-", *notes)))


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Delete a user and end all their sessions (UserRemoved, then SessionEnded user_removed)."""
    with failures_exit_2(), _user_changes() as changes:
        ended = changes.remove(name)
    typer.echo(f"user {name} removed; {sessions_count(ended)} ended")


@users_app.command("set-password")
def users_set_password(
    name: Annotated[str, typer.Argument(help="The user name.")],
    password_stdin: PasswordStdin = False,
) -> None:
    """Replace a user's password and end all their sessions (PasswordChanged, then SessionEnded
    password_changed); the password is prompted for unless --password-stdin is given. It needs
    at least LEDGER_MIN_PASSWORD_LENGTH characters (12 by default)."""
    password = _read_password(from_stdin=password_stdin)
    with failures_exit_2(), _user_changes() as changes:
        ended = changes.set_password(name, password)
    typer.echo(f"password of {name} replaced; {sessions_count(ended)} ended")


@users_app.command("set-scopes")
def users_set_scopes(
    name: Annotated[str, typer.Argument(help="The user name.")],
    scopes: Annotated[
        list[str] | None, typer.Argument(help="Every scope the user holds from now on.")
    ] = None,
) -> None:
    """Give a user exactly these scopes (none when none are named); their sessions that hold any
    other scope end (UserScopesChanged, then SessionEnded scopes_changed)."""
    with failures_exit_2(), _user_changes() as changes:
        ended = changes.set_scopes(name, tuple(scopes or ()))
    held = " ".join(scopes or ()) or "no scopes"
    typer.echo(f"{name} now holds {held}; {sessions_count(ended)} ended")


sessions_app = typer.Typer(help="Live sessions.", no_args_is_help=True)


@sessions_app.command("revoke")
def sessions_revoke(
    user: Annotated[str, typer.Option("--user", help="End every session of this user.")],
) -> None:
    """End every valid session of a user now (SessionEnded revoked); their access tokens are
    refused from then on, and their refresh tokens at once."""
    with failures_exit_2(), _user_changes() as changes:
        ended = changes.revoke(user)
    typer.echo(f"{sessions_count(ended)} of {user} ended")


@contextmanager
def _user_changes() -> Iterator[UserChanges]:
    settings = Settings.from_env()
    info = RequestInfo(f"cli-{uuid.uuid4()}", None, "session-ledger command line")
    with _accounts() as accounts:
        yield UserChanges(
            accounts,
            clock=lambda: datetime.now(UTC),
            policy=settings.policy,
            info=info,
        )


@clients_app.command("add")
def clients_add(
    client_id: Annotated[str, typer.Argument(help="The client id.")],
    confidential: Annotated[
        bool, typer.Option("--confidential", help="The client authenticates with a secret.")
    ] = False,
    secret_stdin: Annotated[
        bool,
        typer.Option(
            "--secret-stdin",
            help="Read the secret from standard input; it needs at least 128 bits"
            " (openssl rand -base64 32 makes one).",
        ),
    ] = False,
    grant: Annotated[
        list[str] | None,
        typer.Option("--grant", help="A grant type the client may use; repeat for more."),
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help=f"A client scope (such as {INTROSPECT_SCOPE}, which lets a confidential client"
            f" introspect tokens, or {SESSIONS_READ_SCOPE}, which lets it follow the session-end"
            " feed); repeat for more.",
        ),
    ] = None,
    redirect_uri: Annotated[
        list[str] | None,
        typer.Option(
            "--redirect-uri",
            help="Where /oauth/authorize may send the user back with a code: an absolute URI,"
            " https (http only on loopback), without fragment, matched exactly; repeat for more."
            " The authorization_code grant needs one.",
        ),
    ] = None,
    require_dpop: Annotated[
        bool,
        typer.Option(
            "--require-dpop",
            help="Refuse the client's token requests without a DPoP proof, so that all its"
            " tokens are bound to its key (RFC 9449 dpop_bound_access_tokens).",
        ),
    ] = False,
) -> None:
    """Create a client. A confidential one without --secret-stdin gets a generated secret,
    printed once. Grants default to authorization_code and refresh_token; password must be
    asked for (RFC 9700 forbids it: the app sees the user's password); client_credentials (a
    token for the client itself, holding its client scopes) is for confidential clients only."""
    confidential = confidential or secret_stdin
    generated = confidential and not secret_stdin
    secret = None
    if secret_stdin:
        secret = _read_secret("secret", from_stdin=True)
    elif generated:
        secret = secrets.token_urlsafe(32)
    with failures_exit_2(), _accounts(secret_key=confidential) as accounts:
        accounts.add_client(
            client_id,
            secret,
            tuple(grant or DEFAULT_GRANTS),
            tuple(scope or ()),
            dpop_bound=require_dpop,
            redirect_uris=tuple(redirect_uri or ()),
        )
    kind = "confidential" if confidential else "public"
    required = ", DPoP proofs required" if require_dpop else ""
    typer.echo(f"{kind} client {client_id} created{required}")
    if generated:
        typer.echo(f"client secret (shown once, store it now): {secret}")


@clients_app.command("remove")
def clients_remove(client_id: Annotated[str, typer.Argument(help="The client id.")]) -> None:
    """Delete a client and end all its sessions (ClientRemoved, then SessionEnded
    client_removed)."""
    with failures_exit_2(), _user_changes() as changes:
        ended = changes.remove_client(client_id)
    typer.echo(f"client {client_id} removed; {sessions_count(ended)} ended")


@clients_app.command("list")
def clients_list() -> None:
    """Every client: id, public or confidential, grants, client scopes, redirect URIs."""
    with failures_exit_2(), _accounts() as accounts:
        clients = accounts.clients()
    for client in clients:
        kind = "confidential" if client.is_confidential else "public"
        dpop = ["dpop-required"] if client.dpop_bound else []
        fields = (
            client.client_id,
            kind,
            ",".join(client.grants),
            " ".join(client.scopes) or "-",
            " ".join(client.redirect_uris) or "-",
            *dpop,
        )
        typer.echo("\t".join(fields))


@contextmanager
def _accounts(*, secret_key: bool = False) -> Iterator[Accounts]:
    """Accounts on the configured database; with `secret_key`, able to hash client secrets."""
    settings = Settings.from_env()
    url = prepare_database(settings)
    with open_pool(url, max_size=1) as pool:
        key = None
        if secret_key:
            sealer = Sealer(settings.key_encryption_key)
            key = load_server_secret(pool, sealer, datetime.now(UTC), CLIENT_SECRET_KEY_NAME)
        try:
            yield Accounts(pool, secret_key=key)
        except AccountError as e:
            typer.echo(f"session-ledger: {e}", err=True)
            raise typer.Exit(1) from None


def _read_password(*, from_stdin: bool) -> str:
    password = _read_secret("password", from_stdin=from_stdin)
    with failures_exit_2():
        least = Settings.from_env().min_password_length
    if len(password) < least:
        typer.echo(
            f"session-ledger: the password has {len(password)} characters; at least {least}"
            " are needed (LEDGER_MIN_PASSWORD_LENGTH)",
            err=True,
        )
        raise typer.Exit(1)
    return password


def _read_secret(what: str, *, from_stdin: bool) -> str:
    if from_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        value = typer.prompt(f"{what.capitalize()}", hide_input=True, confirmation_prompt=True)
    if not value:
        typer.echo(f"session-ledger: the {what} is empty", err=True)
        raise typer.Exit(1)  # as every account that cannot be made as asked (README)
    return value
