"""The embedded default: PostgreSQL from the pgserver package, in a local data directory."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver then uses a directory under /tmp.
    warnings.simplefilter("ignore")
    from pgserver import get_server, pg_ctl
    from pgserver.utils import PostmasterInfo

from ledger.errors import DatabaseUnavailable


def start_embedded(data_dir: Path, *, keep_running: bool = False) -> str:
    """Start (or reuse) the embedded server in `data_dir` and return its connection URL.

    A process that starts the server stops it when it exits (unless `keep_running`); a process
    that finds it running leaves it running, so a short command never stops a server in use.
    """
    data_dir = data_dir.expanduser().resolve()
    stop_on_exit = not keep_running and not is_embedded_running(data_dir)
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir, cleanup_mode="stop" if stop_on_exit else None)
        return str(server.get_uri())
    except (OSError, subprocess.SubprocessError) as e:
        raise DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {data_dir}: {e}"
            f" (its log: {data_dir / 'log'})"
        ) from e


def running_url(data_dir: Path) -> str | None:
    """The superuser URL of the server running on `data_dir`, or None; unlike start_embedded,
    the caller does not become one of the server's users (which would keep it running after the
    process that started it exits)."""
    info = PostmasterInfo.read_from_pgdata(data_dir.expanduser().resolve())
    return info.get_uri() if info is not None and info.is_running() else None


def is_embedded_database(data_dir: Path) -> bool:
    """Whether `data_dir` holds a PostgreSQL database (initialized, running or not)."""
    return (data_dir.expanduser().resolve() / "PG_VERSION").exists()


def is_embedded_running(data_dir: Path) -> bool:
    """Whether a PostgreSQL server is running on `data_dir`."""
    info = PostmasterInfo.read_from_pgdata(data_dir.expanduser().resolve())
    return info is not None and info.is_running()


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded server in `data_dir`; False when none was running there."""
    data_dir = data_dir.expanduser().resolve()
    if not is_embedded_running(data_dir):
        return False
    # PostgreSQL refuses to run as root, so pgserver runs it as its own system user.
    user = "pgserver" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user)
    except (OSError, subprocess.SubprocessError) as e:
        raise DatabaseUnavailable(
            f"could not stop the embedded PostgreSQL in {data_dir}: {e}"
        ) from e
    return True
