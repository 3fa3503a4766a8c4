from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(".session-ledger/pgdata")


class SettingsError(ValueError):
    """Raised at start-up for a missing or malformed environment variable; names it."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable, read once from LEDGER_* environment variables at start-up."""

    database_url: str | None = None
    """PostgreSQL URL (LEDGER_DATABASE_URL); None starts the embedded server."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Data directory of the embedded server (LEDGER_DATA_DIR)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            database_url=_optional_text(env, "LEDGER_DATABASE_URL"),
            data_dir=Path(_optional_text(env, "LEDGER_DATA_DIR") or DEFAULT_DATA_DIR),
        )


def _optional_text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    if not value.strip():
        raise SettingsError(f"{name} is set but empty; unset it or give a value")
    return value.strip()
