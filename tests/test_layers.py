"""Imports point down only: api -> projections -> ledger (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"ledger": 0, "projections": 1, "api": 2}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & LAYERS.keys()


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_import_points_up(package: str) -> None:
    upward = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imported_packages(path)
        if LAYERS[name] > LAYERS[package]
    }
    assert upward == set()


def test_the_check_sees_imports() -> None:
    assert _imported_packages(ROOT / "ledger" / "store.py") == {"ledger"}
