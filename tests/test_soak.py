"""Soak (slow): kill a training run 20 times at random moments (SIGKILL or SIGTERM; during
training, checkpoint writes and evaluation), twice damage the checkpoint the next resume would
read (in a random way), resume each time, and check the finish against an uninterrupted run:
parameters and optimizer state bit for bit, `metrics.jsonl` with the same rows (no duplicated
or missing steps).

Run: `python -m pytest -m slow tests/test_soak.py -s` (prints one JSON summary line).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, metrics
from jaxgpt.optim import make_optimizer
from jaxgpt.step import init_train_state

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20
# The child runs scripts/train.py; for the "in evaluation" moments it first wraps
# jaxgpt.run.evaluate so that the chosen call sends the signal from a timer thread a few
# milliseconds into the evaluation (the kill itself is a real signal).
CHILD = """
import os, runpy, signal, sys, threading
import jaxgpt.run as t
sig, nth, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
if nth:
    orig, calls = t.evaluate, [0]
    def evaluate(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            threading.Timer(delay, os.kill, (os.getpid(), sig)).start()
        return orig(*a, **k)
    t.evaluate = evaluate
sys.argv = ["train.py", *sys.argv[4:]]
runpy.run_path(TRAIN_PY, run_name="__main__")
""".replace("TRAIN_PY", repr(str(ROOT / "scripts" / "train.py")))


def _args(corpus: Path, out: Path) -> list[str]:
    return [
        "--model", "tiny", "--data", str(corpus), "--out", str(out), "--epochs", "8",
        "--batch-size", "4", "--eval-freq", "3", "--eval-iter", "3", "--sample-tokens", "2",
        "--checkpoint-every", "4", "--keep", "3", "--drop-rate", "0.1",
    ]  # fmt: skip


def _spawn(args: list[str], sig: int = 0, nth: int = 0, delay: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD, str(sig), str(nth), str(delay), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def _wait_line(proc: subprocess.Popen, text: str) -> bool:
    for line in proc.stdout:
        if text in line:
            return True
    return False


def _damage(rng: random.Random, run: Path) -> tuple[str, Path | None]:
    """Damage the newest checkpoint, the one the next resume reads first (an older one would
    just be rotated out unread); returns what was done and the damaged folder."""
    steps = checkpoint.list_steps(run)
    if len(steps) < 2:
        return "none (fewer than 2 checkpoints)", None
    step = steps[-1]
    d = run / "checkpoints" / str(step)
    how = rng.choice(["truncate", "garbage", "uncommitted"])
    f = max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif how == "garbage":
        f.write_bytes(os.urandom(f.stat().st_size))
    else:
        (d / checkpoint.COMMIT_MARKER).unlink()
    return f"{how} step {step}", d


def _passed_over(err: str, damaged: Path) -> bool:
    """The resumed run warned that it skipped `damaged` or set it aside (checkpoint.py)."""
    return f"{damaged} is damaged" in err or f"checkpoint {damaged} to " in err


def _state(run: Path):
    model, tc = checkpoint.load_run_config(run)
    tx = make_optimizer(tc, 1)
    like = jax.eval_shape(lambda: init_train_state(model, tx, jax.random.key(0)))
    with checkpoint.manager(run, read_only=True) as mngr:
        return checkpoint.restore(mngr, like)[0]


def _rows(run: Path) -> list[dict]:
    rows = metrics.read_rows(run / metrics.METRICS_FILE)
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]


@pytest.mark.slow
def test_soak_kills_and_damage_end_bit_identical(tmp_path: Path, verdict_text: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(verdict_text[:3000], encoding="utf-8")  # 10 steps per epoch, 80 in all
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = _spawn(_args(corpus, ref))  # the uninterrupted run, alongside
    rng = random.Random(int(os.environ.get("SOAK_SEED", "8")))
    damage_at = set(rng.sample(range(KILLS), 2))
    log, started = [], time.time()
    finished, damaged = False, None  # damaged: the folder the next start must pass over
    passed_over = 0
    for i in range(KILLS):
        args = _args(corpus, run) + (["--resume"] if checkpoint.list_steps(run) else [])
        if not checkpoint.list_steps(run) and run.exists():
            shutil.rmtree(run)  # killed before its first checkpoint: start it again
        kind = rng.choice(["train", "save", "eval", "term", "term_eval"])
        sig = signal.SIGTERM if kind.startswith("term") else signal.SIGKILL
        if kind in ("eval", "term_eval"):  # calls 1-2 are a fresh run's untrained evaluation
            proc = _spawn(args, sig, nth=rng.randint(3, 6), delay=rng.uniform(0.0, 0.05))
        else:
            proc = _spawn(args)
            # Training is under way once this process prints an evaluation line.
            if _wait_line(proc, "(Step "):
                if kind == "save":  # Orbax is writing NAME.orbax-checkpoint-tmp
                    while proc.poll() is None and not any(
                        "tmp" in p.name for p in (run / "checkpoints").glob("*")
                    ):
                        time.sleep(0.002)
                else:
                    time.sleep(rng.uniform(0.0, 0.8))
                if proc.poll() is None:
                    proc.send_signal(sig)
        _, err = proc.communicate(timeout=900)
        rc = proc.returncode
        if rc == 2 and "no intact checkpoint" in err:  # the damage hit every checkpoint left
            log.append({"kind": "restart", "rc": rc})
            shutil.rmtree(run)
            damaged = None
            continue
        assert rc in (0, -9, 143), err[-3000:]
        if damaged is not None:
            assert _passed_over(err, damaged), err[-3000:]
            passed_over, damaged = passed_over + 1, None
        if rc == 143:
            assert "resume with: python scripts/train.py --resume --out" in err, err[-2000:]
        entry = {"kind": kind, "rc": rc, "steps": checkpoint.list_steps(run)}
        rows = metrics.read_rows(run / metrics.METRICS_FILE)
        entry["last_row_step"] = rows[-1]["step"] if rows else None
        if i in damage_at and rc != 0:
            entry["damaged"], damaged = _damage(rng, run)
        log.append(entry)
        if rc == 0:
            finished = True
            break
    while not finished:  # run to the end
        proc = _spawn(_args(corpus, run) + ["--resume"])
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        if damaged is not None:
            assert _passed_over(err, damaged), err[-3000:]
            passed_over += 1
        finished = True
    _, err = reference.communicate(timeout=1800)
    assert reference.returncode == 0, err[-3000:]
    got, want = _state(run), _state(ref)
    assert int(got.step) == int(want.step) == 80
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    jax.tree.map(np.testing.assert_array_equal, got.opt_state, want.opt_state)
    steps = [r["step"] for r in _rows(run)]
    assert steps == [r["step"] for r in _rows(ref)] and len(steps) == len(set(steps))
    assert _rows(run) == _rows(ref)
    kills = [e for e in log if e["rc"] in (-9, 143)]
    summary = {
        "kills": len(kills),
        "by_kind": {
            k: sum(e["kind"] == k for e in kills) for k in sorted({e["kind"] for e in kills})
        },
        "sigkill": sum(e["rc"] == -9 for e in kills),
        "sigterm_saved": sum(e["rc"] == 143 for e in kills),
        "damaged": [e["damaged"] for e in log if "damaged" in e],
        "damage_passed_over": passed_over,
        "newest_checkpoint_per_kill": [max(e["steps"], default=None) for e in kills],
        "identical_finish": True,
        "minutes": round((time.time() - started) / 60, 1),
    }
    print(json.dumps(summary))
    (tmp_path / "soak.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    assert len(kills) >= KILLS - 1  # each round interrupted the run (the last may finish it)
    assert max(max(e["steps"], default=0) for e in kills) >= 40  # kills spread over the run


def _spawn_pair(args: list[str], port: int) -> list[subprocess.Popen]:
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [_spawn([*args, *flags, "--process-id", str(i)]) for i in range(2)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAIR = ["--mesh", "fsdp=2", "--heartbeat-timeout", "20"]
# Exit statuses a round may end with: done, SIGKILLed, the survivor of a lost process (its own
# clean stop, or JAX's abort when the lost one was process 0, the coordination service's
# host), stopped by the agreed SIGTERM.
PAIR_EXITS = {0, -9, 75, -6, 134, 143}


@pytest.mark.slow
def test_soak_two_processes_end_as_the_unbroken_pair(tmp_path: Path, verdict_text: str) -> None:
    """Two processes (fsdp=2): kill one (SIGKILL), both, or send one a SIGTERM (an agreed stop),
    at random moments, 8 times; resume both each time; the finish equals the unbroken pair."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(verdict_text[:3000], encoding="utf-8")
    ref, run = tmp_path / "ref", tmp_path / "run"
    for p in _spawn_pair(_args(corpus, ref) + PAIR, _free_port()):
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err[-3000:]
    rng = random.Random(int(os.environ.get("SOAK_SEED", "8")))
    log, started = [], time.time()
    for _ in range(8):
        resume = ["--resume"] if checkpoint.list_steps(run) else []
        if not resume and run.exists():
            shutil.rmtree(run)
        procs = _spawn_pair(_args(corpus, run) + PAIR + resume, _free_port())
        kind = rng.choice(["kill_0", "kill_1", "kill_both", "term_0", "term_1"])
        if _wait_line(procs[0], "(Step "):
            time.sleep(rng.uniform(0.0, 1.5))
            victims = [0, 1] if kind == "kill_both" else [int(kind[-1])]
            for v in victims:
                if procs[v].poll() is None:
                    procs[v].send_signal(signal.SIGTERM if kind.startswith("term") else 9)
        rcs = []
        for p in procs:
            _, err = p.communicate(timeout=300)
            rcs.append(p.returncode)
            assert p.returncode in PAIR_EXITS, err[-3000:]
        log.append({"kind": kind, "rcs": rcs, "steps": checkpoint.list_steps(run)})
        if rcs == [0, 0]:
            break
    if not log or log[-1]["rcs"] != [0, 0]:
        for p in _spawn_pair(_args(corpus, run) + PAIR + ["--resume"], _free_port()):
            _, err = p.communicate(timeout=1800)
            assert p.returncode == 0, err[-3000:]
    got, want = _rows(run), _rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for k in ("train_loss", "val_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-5), (g["step"], k)
    print(json.dumps({"pair_rounds": log, "minutes": round((time.time() - started) / 60, 1)}))
