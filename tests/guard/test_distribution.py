"""The guard is its own distribution: resource servers install it without the server's
dependencies, so it imports nothing but the standard library, PyJWT, httpx and (for its FastAPI
dependency only) FastAPI."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import session_ledger_guard

ALLOWED = {"jwt", "httpx", "fastapi", "session_ledger_guard"}
SOURCES = sorted(Path(session_ledger_guard.__file__).parent.glob("*.py"))


def test_the_guard_imports_only_the_standard_library_pyjwt_httpx_and_fastapi() -> None:
    imported = set()
    for source in SOURCES:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert SOURCES, "no guard sources found"
    outside = imported - ALLOWED - set(sys.stdlib_module_names) - {"__future__"}
    assert outside == set()


def test_the_guard_declares_what_it_imports() -> None:
    pyproject = (Path(__file__).parents[2] / "guard" / "pyproject.toml").read_text()
    assert '"pyjwt[crypto]>=2.8"' in pyproject
    assert '"httpx>=0.27"' in pyproject
    assert 'fastapi = ["fastapi>=0.110"]' in pyproject
