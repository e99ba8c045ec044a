"""Compiling ahead (`jaxgpt.ahead`): each program of a run compiles once, in a worker thread;
the phase timer tells the compilation the run waited for from the rest; and the results do not
depend on it: the same losses with it on and off, through the command line, and across a
resume that switches it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import checkpoint, metrics
from jaxgpt.ahead import Ahead, lowered
from jaxgpt.config import TrainConfig
from jaxgpt.train import fit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(verdict_text[:3000], encoding="utf-8")
    return path


def test_programs_compile_once_off_the_main_thread(
    tmp_path: Path, corpus: Path, tiny_config, compiles
):
    # In-process fit on the suite's 2 CPU devices (a data=2 mesh): the train and eval steps,
    # the sampler and the fingerprint compile once each, in a worker, never on the main thread.
    tc = TrainConfig(
        data=str(corpus), out=str(tmp_path / "run"), max_steps=3, batch_size=4, eval_freq=2,
        eval_iter=2, sample_tokens=3, checkpoint_every=2, compile_cache=False,
    )  # fmt: skip
    result = fit(tiny_config, tc, progress=False, on_event=lambda *a: None)
    counts = Counter(compiles)
    for program in ("jit(train_step)", "jit(_generate_padded)", "jit(_all_leaf_sums)"):
        where = {t for t, p in compiles if p == program}
        assert len(where) == 1 and not where & {"MainThread"}, (program, where)
        assert sum(n for (t, p), n in counts.items() if p == program) == 1, program
    report = result.compile
    assert report["waited"] == result.times["compile"]
    assert report["seconds"] >= report["waited"] and report["overlapped"] >= 0
    assert report["programs"]["train_step"] > 0


def test_phase_timer_tells_waited_from_overlapped_compilation() -> None:
    timer = metrics.PhaseTimer()
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T)
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    with timer, Ahead(timer) as ahead:
        with timer.phase("work"):
            ahead.submit("f", lowered(f, x))
            time.sleep(0.5)  # the main thread works while the worker compiles
        ahead.wait("f")
        ahead.wait("f")  # a second wait is free
        with timer.phase("work"):
            f(jnp.ones((64, 64))).block_until_ready()  # compiled ahead: nothing to compile
    report, times = timer.compile_report(), timer.summary()
    assert report["overlapped"] > 0 and report["programs"]["<lambda>"] > 0
    assert times["compile"] == report["waited"] < report["seconds"]
    assert times["work"] == pytest.approx(0.5, abs=0.2)
    assert sum(v for k, v in times.items() if k != "total") == pytest.approx(
        times["total"], abs=1e-2
    )


def test_disabled_ahead_compiles_nothing() -> None:
    ahead = Ahead(enabled=False)
    ahead.submit("never", lambda: pytest.fail("ran"))
    ahead.wait("never")
    ahead.close()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}  # JAX logs each compilation on stderr
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def _compiled_once(done: subprocess.CompletedProcess) -> bool:
    """Whether the train step and the sampler compiled once each: a program compiled ahead for
    another placement than the run's (one device: fresh weights not committed, a restored
    state committed) would compile again when the run calls it."""
    names = re.findall(r"Finished XLA compilation of (\S+) in", done.stderr)
    return names.count("jit(train_step)") == 1 and names.count("jit(_generate_padded)") == 1


def _losses(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]


def _printed(stdout: str) -> list[str]:
    keep = ("Training loss", "Validation loss", "Ep ", "Every effort")
    return [line for line in stdout.splitlines() if line.startswith(keep)]


DEFAULT = ["--batch-size", "4", "--eval-freq", "2", "--eval-iter", "2"]  # the default run's
# The book's run on the tiny model: dropout, batch 2, its optimizer, evaluations and prompt.
BOOK = [
    "--drop-rate", "0.1", "--batch-size", "2", "--lr", "4e-4", "--weight-decay", "0.1",
    "--eval-freq", "5", "--eval-iter", "5", "--start-context", "Every effort moves you",
]  # fmt: skip


def _base(corpus: Path, flags: list[str]) -> list[str]:
    return ["--model", "tiny", "--data", str(corpus), "--sample-tokens", "4",
            "--checkpoint-every", "4", "--no-compile-cache", *flags]  # fmt: skip


def test_same_losses_with_and_without_compiling_ahead_and_across_a_resume(
    tmp_path: Path, corpus: Path
) -> None:
    # Straight to step 8 without compiling ahead; compiling ahead to step 4, then resumed (the
    # saved settings: compiling ahead again, now for a restored state): every logged loss
    # equal to the last digit, the same final weights, and each program compiled once.
    base = _base(corpus, DEFAULT)
    _run([*base, "--max-steps", "8", "--out", str(tmp_path / "off"), "--no-compile-ahead"],
         tmp_path)  # fmt: skip
    on = _run([*base, "--max-steps", "4", "--out", str(tmp_path / "on")], tmp_path)
    first = _losses(tmp_path / "on")  # ends with an evaluation of step 4
    resumed = _run(["--resume", "--out", str(tmp_path / "on"), "--max-steps", "8"], tmp_path)
    assert "compilation" in on.stdout and "overlapped other work" in on.stdout
    assert _compiled_once(on) and _compiled_once(resumed)  # one device, fresh and restored
    want = {r["step"]: r for r in _losses(tmp_path / "off")}
    got = {r["step"]: r for r in first + _losses(tmp_path / "on")}
    assert set(want) <= set(got) and all(got[s] == row for s, row in want.items())
    a, b = (checkpoint.load_run(tmp_path / name)[1] for name in ("on", "off"))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.slow
def test_book_run_prints_the_same_with_and_without_compiling_ahead(
    tmp_path: Path, corpus: Path
) -> None:
    base = [*_base(corpus, BOOK), "--max-steps", "8"]
    on = _run([*base, "--out", str(tmp_path / "on")], tmp_path)
    off = _run([*base, "--out", str(tmp_path / "off"), "--no-compile-ahead"], tmp_path)
    assert _printed(on.stdout) == _printed(off.stdout) and len(_printed(on.stdout)) >= 5
    assert _losses(tmp_path / "on") == _losses(tmp_path / "off")
