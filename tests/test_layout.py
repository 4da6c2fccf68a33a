"""The folders are the architecture: ``server/`` and ``trainer/`` meet only in
``store/``, and neither imports the other (the server starts the trainer as a
process). Imports are read from the syntax tree, function-local ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# package -> the top-level packages it must never import
FORBIDDEN = {
    "store": {"server", "trainer"},
    "server": {"trainer"},
    "trainer": {"server"},
}


def imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """Top-level packages a module imports (``import a.b``, ``from a.b import c``,
    ``from . import x`` resolved against ``package``), with their line numbers."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top = package if node.level else (node.module or "").split(".")[0]
            found.add((top, node.lineno))
    return found


def violations(root: Path) -> list[str]:
    problems = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for top, line in sorted(imported_packages(path, package)):
                if top in forbidden:
                    problems.append(f"{path.relative_to(root)}:{line} imports {top}")
    return problems


def test_server_and_trainer_meet_only_in_the_store():
    assert violations(REPO) == []


def test_the_rule_catches_a_hidden_import(tmp_path):
    for package in FORBIDDEN:
        (tmp_path / package).mkdir()
    (tmp_path / "trainer" / "sneaky.py").write_text("def f():\n    from server.app import create_app\n")
    (tmp_path / "store" / "leak.py").write_text("import trainer.cycle\n")
    (tmp_path / "server" / "fine.py").write_text("from store import tables\nfrom . import deps\n")
    assert violations(tmp_path) == ["store/leak.py:1 imports trainer", "trainer/sneaky.py:2 imports server"]


@pytest.mark.parametrize("module", ["trainer.cycle", "trainer.__main__", "store.pairs", "store.exchange.export"])
def test_the_trainer_side_does_not_load_the_web_stack(module):
    probe = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "print(sorted(m for m in ('fastapi', 'starlette', 'server') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
