"""scripts/convert.py: conversions between every format, --check, exit codes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "convert.py"
pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("transformers")


def _main():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("convert_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _diff(out: str) -> float:
    line = next(s for s in out.splitlines() if s.startswith("max |logit diff|"))
    return float(line.split(":")[1].split()[0])


def test_chain_of_conversions_with_check(
    openai_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = _main()
    steps = [
        (["--from", "openai", str(openai_dir), "--to", "hf", str(tmp_path / "hf")]),
        (["--from", "hf", str(tmp_path / "hf"), "--to", "book", str(tmp_path / "b.pth")]),
        (["--from", "book", str(tmp_path / "b.pth"), "--n-heads", "2", "--to", "jaxgpt",
          str(tmp_path / "p.npz")]),
        (["--from", "jaxgpt", str(tmp_path / "p.npz"), "--to", "book",
          str(tmp_path / "b.safetensors")]),
        (["--from", "book", str(tmp_path / "b.safetensors")]),
    ]  # fmt: skip
    for argv in steps:
        assert main([*argv, "--check"]) == 0, argv
        out = capsys.readouterr().out
        assert _diff(out) <= 1e-4, out  # observed ~1e-6 for every source format


def test_refuses_to_overwrite(openai_dir: Path, tmp_path: Path) -> None:
    main = _main()
    (tmp_path / "hf").mkdir()
    argv = ["--from", "openai", str(openai_dir), "--to", "hf", str(tmp_path / "hf")]
    assert main(argv) == 2
    assert main([*argv, "--force"]) == 0


def test_help_exits_zero() -> None:
    with pytest.raises(SystemExit) as e:
        _main()(["--help"])
    assert e.value.code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "tf", "x", "--check"], "--from format 'tf'"),
        (["--from", "book", "missing.pth", "--check"], "missing.pth does not exist"),
        (["--from", "openai", "x"], "nothing to do"),
    ],
)
def test_bad_input_one_line_exit_2(argv: list[str], message: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr
