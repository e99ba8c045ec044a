"""scripts/train.py end to end on a tiny config, --help, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt import metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(verdict_text[:3000], encoding="utf-8")
    return path


def _tiny(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data", str(corpus), "--out", str(out), "--max-steps", "6",
        "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "2", "--sample-tokens", "3",
        "--checkpoint-every", "4", *extra,
    ]  # fmt: skip


def test_end_to_end_tiny_run_and_resume(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    done = _run(*_tiny(corpus, out), cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert done.returncode == 0, done.stderr
    # The persistent compilation cache is on by default, in the user's cache (XDG_CACHE_HOME);
    # the run ends with its time breakdown.
    assert any((tmp_path / "xdg" / "jaxgpt" / "xla").iterdir())
    assert "Wall time: compile" in done.stdout and ", train " in done.stdout
    assert "Training loss:" in done.stdout and "Ep 1 (Step 000000)" in done.stdout
    assert "Every effort moves you" in done.stdout  # the sample
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["emb_dim"] == 32 and config["train"]["max_steps"] == 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3, 5, 6] and set(rows[0]) == set(metrics.ROW_KEYS)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 6]
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "perplexity.png"}
    # --resume takes the run's saved settings; --max-steps extends it.
    more = _run(
        "--resume", "--out", str(out), "--max-steps", "8", "--no-compile-cache",
        "--cache-dir", str(tmp_path / "cache2"), cwd=tmp_path,
    )  # fmt: skip
    assert more.returncode == 0, more.stderr
    assert not (tmp_path / "cache2").exists()
    assert json.loads((out / "config.json").read_text())["train"]["compile_cache"] is False
    assert "from step 6" in more.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3, 5, 6, 7, 8]


def test_help_exits_zero(tmp_path: Path) -> None:
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0
    for flag in ("--model", "--context-length", "--max-steps", "--min-lr", "--resume", "--keep"):
        assert flag in done.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "nope"], "unknown model preset 'nope'"),
        (["--lr", "-0.1"], "lr=-0.1 must be positive"),
        (["--data", "/no/such/file.txt"], "does not exist"),
        (["--epochs", "x"], "invalid int value"),
        (["--n-heads", "3"], "not divisible"),
        (["--resume", "--out", "empty"], "no checkpoint to resume"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_input_keeps_an_existing_run(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # looks like a run: must not be overwritten
    (out / "checkpoints").mkdir()
    done = _run(*_tiny(corpus, out), cwd=tmp_path)
    assert done.returncode == 2 and "already holds a run" in done.stderr
    done = _run(*_tiny(corpus, out, "--lr", "-1"), cwd=tmp_path)
    assert done.returncode == 2
    assert (out / "config.json").read_text() == "{}" and (out / "checkpoints").is_dir()
