"""benchmarks/device_check.py: the plan it prints on a CPU (`--dry-run`), and (slow) the whole
check shrunk to a tiny model (`--smoke`), its steps run in order with their results recorded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
ORDER = ["gpu tests", "parity", "step small", "step book-124m", "step gpt2", "sampling",
         "planner", "measured"]  # fmt: skip


def test_dry_run_prints_the_plan_within_eight_minutes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^\d+\. (.+?) \((\d+) s\): ", done.stdout, re.M)
    assert [name for name, _ in steps] == ORDER
    assert sum(int(s) for _, s in steps) <= 480
    assert "time budget" in done.stdout and done.stdout.count("$ ") == len(ORDER)
    for model in ("small", "book-124m", "gpt2"):  # the step benchmark's three variants each
        assert f"--model {model} " in done.stdout
    assert "float32,attention_xla,cudnn_scan,xla_scan" in done.stdout
    assert "--plan-json" in done.stdout and "-m gpu" in done.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
def test_smoke_run_records_every_step(tmp_path: Path) -> None:
    out = tmp_path / "device.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["steps"]) == ["gpu tests", "parity", "step tiny", "sampling", "planner",
                                     "measured"]  # fmt: skip
    steps = report["steps"]
    assert steps["parity"]["status"] == "ok" and steps["sampling"]["status"] == "ok"
    rows = {r["variant"]: r for r in steps["step tiny"]["result"]["results"]}
    assert rows["float32"]["tokens_per_s"] > 0 and rows["attention_xla"]["tokens_per_s"] > 0
    assert "| step | status |" in done.stdout
