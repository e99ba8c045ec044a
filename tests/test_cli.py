"""The `jaxgpt` command: `python -m jaxgpt` lists and runs the subcommands, each the same
parser as its `scripts/*.py`; an unknown one is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_pyproject_declares_the_console_script() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\njaxgpt = "jaxgpt.cli:main"\n' in text


def test_no_command_lists_them_and_exits_2_help_exits_0() -> None:
    bare, helped = _run("-m", "jaxgpt"), _run("-m", "jaxgpt", "--help")
    assert bare.returncode == 2 and helped.returncode == 0
    assert bare.stderr == helped.stdout
    for name, (_, script, _) in COMMANDS.items():
        assert f"  {name} " in helped.stdout and script in helped.stdout


def test_unknown_command_is_one_line_exit_2() -> None:
    done = _run("-m", "jaxgpt", "trian", "--epochs", "1")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"jaxgpt: error: unknown command 'trian'; choose one of {', '.join(COMMANDS)}"
    ]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_is_its_script_help(name: str) -> None:
    script = COMMANDS[name][1]
    via_jaxgpt, via_script = _run("-m", "jaxgpt", name, "--help"), _run(script, "--help")
    assert via_jaxgpt.returncode == via_script.returncode == 0, via_jaxgpt.stderr
    # The usage lines differ by the program name (argparse rewraps them around it); the
    # description and every flag's help are the same text.
    (use_j, body_j), (use_s, body_s) = (r.stdout.split("\n\n", 1) for r in (via_jaxgpt, via_script))
    assert body_j == body_s
    assert use_j.split()[1:3] == ["jaxgpt", name] and use_s.split()[1] == Path(script).name
    assert use_j.split()[3:] == use_s.split()[2:]


def test_jaxgpt_runs_a_subcommand_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    done = _run(
        "-m", "jaxgpt", "generate", "--model", "tiny", "--max-new-tokens", "3", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out.write_text(done.stdout)
    assert '"results"' in done.stdout and "Every effort moves you" in done.stdout
