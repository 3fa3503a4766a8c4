"""The layout DESIGN.md draws, enforced: imports point down only (api -> projections -> ledger),
the pure core holds no SQL and no web, every event read goes through the event store, and the
application core knows neither HTTP nor the command line."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"ledger": 0, "projections": 1, "api": 2}
WEB = {"fastapi", "starlette", "jwt", "uvicorn", "typer"}
"""Web, token and command-line libraries: the api package's to use, nobody else's."""
DATABASE = {"psycopg", "psycopg_pool"}
PURE = sorted(p for p in (ROOT / "projections").glob("*.py") if p.name != "__init__.py")
"""The folds, deciders, replay and summaries; the modules that persist live in projections/sql."""
CORE = sorted((ROOT / "api").glob("*.py"))
"""The application core: use cases, accounts, keys, tokens, throttle, settings, refusals."""
EVENTS_SQL = re.compile(r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+events\b")  # our SQL is upper case


def _imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports (`a.b.c` from `from a.b import c` too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imports(path)}


def _module_path(name: str) -> Path | None:
    """The file of one of the project's modules, or None for a name that is not one."""
    for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/")):
        if candidate.suffix == ".py" and candidate.exists():
            return candidate
        if (candidate / "__init__.py").exists():
            return candidate / "__init__.py"
    return None


def _closure(path: Path) -> set[Path]:
    """`path` and every project module it imports, directly or not."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in _imports(current):
            if name.split(".")[0] in LAYERS and (found := _module_path(name)) is not None:
                todo.append(found)
    return seen


def _report(paths: Iterable[Path], banned: set[str]) -> set[str]:
    return {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in paths
        for name in _roots(path) & banned
    }


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_import_points_up(package: str) -> None:
    upward = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _roots(path) & LAYERS.keys()
        if LAYERS[name] > LAYERS[package]
    }
    assert upward == set()


def test_the_pure_core_imports_no_database_driver() -> None:
    assert _report(PURE, DATABASE) == set()


@pytest.mark.parametrize("package", ["ledger", "projections"])
def test_no_web_or_token_library_below_api(package: str) -> None:
    assert _report((ROOT / package).rglob("*.py"), WEB) == set()


def test_the_application_core_knows_no_http_and_no_command_line() -> None:
    audiences = {"fastapi", "starlette", "uvicorn", "typer", "api.http", "api.cli"}
    found = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in CORE
        for name in _imports(path)
        if any(name == a or name.startswith(f"{a}.") for a in audiences)
    }
    assert found == set()


def test_settings_import_no_module_that_runs_sql() -> None:
    reached = _closure(ROOT / "api" / "settings.py")
    assert _report(reached, DATABASE) == set()


@pytest.mark.parametrize("package", ["projections", "api"])
def test_only_the_ledger_queries_the_events_table(package: str) -> None:
    found = {
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in (ROOT / package).rglob("*.py")
        for match in EVENTS_SQL.finditer(path.read_text(encoding="utf-8"))
    }
    assert found == set()


def test_the_checks_see_what_they_look_for() -> None:
    assert _roots(ROOT / "ledger" / "store.py") >= {"ledger", "psycopg"}
    assert "api.http.errors" in _imports(ROOT / "api" / "http" / "app.py")
    assert ROOT / "ledger" / "db.py" in _closure(ROOT / "api" / "throttle.py")
    assert EVENTS_SQL.search((ROOT / "ledger" / "store.py").read_text(encoding="utf-8"))
    assert {p.name for p in PURE} >= {"session.py", "summaries.py", "replay.py", "streams.py"}
