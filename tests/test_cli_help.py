"""`--help` of every command keeps every option name whole, at any terminal width."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from specforge.cli import app

#: The click group typer makes of the app (typer may bring its own copy of click).
COMMAND = typer.main.get_command(app)


def _appears_whole(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


@pytest.mark.parametrize("columns", [80, 60])
def test_every_option_name_of_every_command_appears_whole_in_help(columns):
    runner = CliRunner()
    env = {"COLUMNS": str(columns)}
    top = runner.invoke(app, ["--help"], env=env)
    assert top.exit_code == 0, top.output
    assert len(COMMAND.commands) >= 10
    checked = 0
    for name, command in COMMAND.commands.items():
        assert _appears_whole(name, top.output), name
        result = runner.invoke(app, [name, "--help"], env=env)
        assert result.exit_code == 0, (name, result.output)
        assert "…" not in result.output, (name, result.output)
        names = [opt for param in command.params if param.param_type_name == "option"
                 for opt in (*param.opts, *param.secondary_opts)] + ["-h", "--help"]
        checked += len(names)
        for option in names:
            assert _appears_whole(option, result.output), (name, option, result.output)
    assert checked >= 30  # the options were found: --nproc-per-node, --data-parallel, ...
