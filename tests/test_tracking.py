"""--tensorboard and --wandb through scripts/train.py: the same rows as metrics.jsonl, read back
with TensorBoard's and W&B's own readers, across a resume; one-line errors without the extras."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from jaxgpt import metrics, tracking
from jaxgpt.commands.train import main
from jaxgpt.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCALARS = [k for k in metrics.ROW_KEYS if k != "step"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(verdict_text[:3000], encoding="utf-8")
    return path


def _train(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr
    return done


def _tensorboard(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """{tag: [(step, value)]} and the text tags, as TensorBoard's EventAccumulator reads them
    (it drops what a purge at a resume marked stale)."""
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return scalars, tags["tensors"]


def _wandb_records(run_file: Path) -> list[dict]:
    """The records of an offline W&B run file, as W&B's own reader prints them."""
    wandb_cli = [sys.executable, "-c", "from wandb.cli.cli import cli; cli()"]
    cmd = [*wandb_cli, "leet", "inspect", "--json", str(run_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_tensorboard_and_wandb_log_metrics_rows_across_a_resume(
    tmp_path: Path, corpus: Path
) -> None:
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {f"WANDB_{d}_DIR": str(tmp_path / "wandb-home") for d in ("CONFIG", "CACHE", "DATA")}
    tiny = [
        "--model", "tiny", "--data", str(corpus), "--max-steps", "5", "--batch-size", "4",
        "--eval-freq", "2", "--eval-iter", "2", "--sample-tokens", "3", "--checkpoint-every",
        "4", "--cache-dir", str(tmp_path / "cache"), "--no-reuse-host-memory",
    ]  # fmt: skip
    _train(*tiny, "--out", str(out), "--tensorboard", "--wandb", "jaxgpt-tests", env=env)
    first_config = json.loads((out / "config.json").read_text())
    first_rows = metrics.read_rows(out / metrics.METRICS_FILE)
    assert [r["step"] for r in first_rows] == [1, 3, 5]
    # Killed after step 5's row but before its checkpoint: the resume restores step 4 and
    # computes step 5 again (metrics.jsonl drops its rows past 4 first).
    shutil.rmtree(out / "checkpoints" / "5")
    _train("--resume", "--out", str(out), "--max-steps", "7", env=env)
    rows = metrics.read_rows(out / metrics.METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 3, 5, 7]

    # TensorBoard: each field a scalar at every logged step, once, equal to the row's value
    # (event files hold float32), and the config as text.
    scalars, texts = _tensorboard(out / tracking.TENSORBOARD_DIR)
    assert sorted(scalars) == sorted(SCALARS) and "config/text_summary" in texts
    for name in SCALARS:
        want = [(r["step"], float(np.float32(r[name]))) for r in rows]
        got = scalars[name]
        if name == "tokens_per_sec":  # wall-clock: steps only
            got, want = [s for s, _ in got], [s for s, _ in want]
        assert got == want, name

    # W&B: one run id for both processes (kept in the run folder), each step once, the values
    # of metrics.jsonl in full precision, config.json as the run's config.
    run_id = json.loads((out / tracking.WANDB_FILE).read_text())["id"]
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2
    logged, configs = [], []
    for f in files:
        for rec in _wandb_records(f):
            if rec["type"] == "history":
                logged.append(rec["history"]["item"])
            elif rec["type"] == "run":
                assert rec["run"]["run_id"] == run_id and rec["run"]["project"] == "jaxgpt-tests"
                configs.append(rec["run"]["config"]["update"])
    assert [h["_step"] for h in logged] == [1, 3, 5, 7]  # 5: the first run's, as W&B had it
    for h, r in zip(logged, rows, strict=True):
        assert {k: h[k] for k in SCALARS if k != "tokens_per_sec"} == {
            k: r[k] for k in SCALARS if k != "tokens_per_sec"
        }
    assert {k: configs[0][k] for k in ("model", "train")} == first_config


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tensorboard"], "--tensorboard needs the tensorboardX package, which is not "
         "installed; pip install 'jaxgpt[tensorboard]'"),
        (["--wandb", "p"], "--wandb needs the wandb package, which is not installed; pip "
         "install 'jaxgpt[wandb]'"),
        (["--wandb", "a/b"], "wandb='a/b' is not a W&B project name"),
    ],
)  # fmt: skip
def test_missing_extra_is_one_line_and_exit_2(
    tmp_path: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # None: `import` raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--data", str(corpus), "--out", str(out), *flags]
    assert main([*argv, "--no-compile-cache", "--no-reuse-host-memory"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_tensorboard_folder() -> None:
    run = Path("runs/x")
    assert tracking.tensorboard_dir(run, TrainConfig()) is None
    assert tracking.tensorboard_dir(run, TrainConfig(tensorboard="")) == run / "tensorboard"
    assert tracking.tensorboard_dir(run, TrainConfig(tensorboard="tb/x")) == Path("tb/x")
