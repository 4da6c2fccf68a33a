"""The README documents every setting and every CLI command."""

from __future__ import annotations

import argparse

import pytest

from server.cli import build_parser
from store.settings import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _commands(parser: argparse.ArgumentParser, prefix: str = "tuneloop") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix} {name}")
                found.extend(nested or [f"{prefix} {name}"])
    return found


def test_every_setting_is_in_the_readme():
    names = [f"TUNELOOP_{name.upper()}" for name in Settings.model_fields]
    missing = [name for name in names if f"`{name}`" not in README]
    assert missing == []


def test_every_cli_command_is_in_the_readme():
    commands = _commands(build_parser())
    assert "tuneloop keys create" in commands and "tuneloop adapters rollback" in commands
    assert "tuneloop export" in commands and "tuneloop import" in commands
    missing = [c for c in commands if f"`{c}" not in README]
    assert missing == []


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and command group, as argv prefixes (``()`` is ``tuneloop`` itself)."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_command_paths(sub, (*prefix, name)))
    return found


@pytest.mark.parametrize("argv", _command_paths(build_parser()), ids=lambda argv: " ".join(argv) or "tuneloop")
def test_every_command_has_help(argv, capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith(f"usage: {' '.join(('tuneloop', *argv))}")
