"""Every run resumes, through `scripts/train.py` as a user runs it: scanned layers (one device,
scan switched on and off), every switch on a mesh of 8 simulated devices resumed on one
device, two processes (clean, after one is killed with SIGKILL, after a SIGTERM to one of
them) and two processes resumed by one.

Each resumed run is compared with the same run left unbroken, row by row of `metrics.jsonl`
(train and validation loss, gradient norm after every step).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxgpt import checkpoint, metrics, runguard

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
# One mesh of 8 simulated CPU devices against one device: the same float32 math with the
# reductions split and summed in another order; observed differences are ~1e-7 relative.
MESH_RTOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "verdict.txt"
    path.write_text(verdict_text, encoding="utf-8")  # 36 batches of 8 x 16 tokens per epoch
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compilation cache for the module's runs: the same programs compile once."""
    return tmp_path_factory.mktemp("cache")


def _args(corpus: Path, out: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--drop-rate", "0.1", "--data", str(corpus), "--out", str(out),
        "--batch-size", "8", "--max-steps", str(steps), "--eval-freq", "1", "--eval-iter", "1",
        "--sample-tokens", "1", "--checkpoint-every", "5", "--cache-dir", str(cache), *extra,
    ]  # fmt: skip


def _env(devices: int = 1) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(TRAIN), *args],
        capture_output=True, text=True, timeout=600, env=_env(devices), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(out: Path) -> list[dict]:
    return metrics.read_rows(out / metrics.METRICS_FILE)


def _same_rows(got: list[dict], want: list[dict], rtol: float = 0.0) -> None:
    """Equal steps, tokens and epochs; losses and gradient norms equal (rtol 0: bit for bit)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert (g["tokens_seen"], g["epoch"]) == (w["tokens_seen"], w["epoch"])
        for k in ("train_loss", "val_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=rtol, abs=0), (g["step"], k, g[k], w[k])


# ----------------------------------------------------------------------------- scanned layers


@pytest.fixture(scope="module")
def scanned_ref(tmp_path_factory: pytest.TempPathFactory, corpus: Path, cache: Path) -> list:
    """12 steps of an unbroken scanned run on one device."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(*_args(corpus, out, cache, 12, "--scan-layers"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    return rows


def test_scanned_run_resumes_bit_for_bit(tmp_path: Path, corpus: Path, cache: Path, scanned_ref):
    out = tmp_path / "run"
    _train(*_args(corpus, out, cache, 5, "--scan-layers"))
    assert checkpoint.list_steps(out) == [5]
    done = _train("--resume", "--out", str(out), "--max-steps", "12")
    assert "from step 5" in done.stdout
    _same_rows(_rows(out), scanned_ref)  # the bar: 1e-6 relative; it is bit for bit


# Every switch that keeps float32 (bf16 is tested on meshes in test_parallel.py), with
# micro-batches of 8 rows: one per device of an 8-device mesh.
SWITCHES = ("--scan-layers", "--remat", "dots", "--grad-accum", "2", "--vocab-pad", "64",
            "--batch-size", "16")  # fmt: skip


@pytest.fixture(scope="module")
def switches_ref(tmp_path_factory: pytest.TempPathFactory, corpus: Path, cache: Path) -> list:
    """12 steps of an unbroken run with every switch on, on one device."""
    out = tmp_path_factory.mktemp("switches") / "run"
    _train(*_args(corpus, out, cache, 12, *SWITCHES))
    return _rows(out)


def test_every_switch_on_a_mesh_resumes_on_one_device(
    tmp_path: Path, corpus: Path, cache: Path, switches_ref
) -> None:
    out = tmp_path / "run"
    first = _train(*_args(corpus, out, cache, 5, *SWITCHES, "--mesh", "data=2,fsdp=4"), devices=8)
    assert "mesh {'data': 2, 'fsdp': 4}" in first.stdout
    done = _train("--resume", "--out", str(out), "--max-steps", "12", "--mesh", "data=1")
    assert "from step 5" in done.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["remat"] == "dots" and saved["train"]["grad_accum"] == 2
    _same_rows(_rows(out), switches_ref, MESH_RTOL)


def test_scan_layers_switch_off_and_on_across_resumes(
    tmp_path: Path, corpus: Path, cache: Path, scanned_ref
) -> None:
    out = tmp_path / "run"
    _train(*_args(corpus, out, cache, 4, "--scan-layers"))
    _train("--resume", "--out", str(out), "--max-steps", "8", "--no-scan-layers")
    assert json.loads((out / "config.json").read_text())["model"]["scan_layers"] is False
    _train("--resume", "--out", str(out), "--max-steps", "12", "--scan-layers")
    # Unrolled and scanned blocks are the same math; XLA may order a reduction differently.
    _same_rows(_rows(out), scanned_ref, MESH_RTOL)
    saved = checkpoint.load_run(out)[1]
    assert "trf_blocks" in saved and "trf_blocks_0" not in saved  # loaded as last run


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_pair(args: list[str]) -> list[subprocess.Popen]:
    coord = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    return [
        subprocess.Popen(
            [sys.executable, str(TRAIN), *args, *coord, "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )  # fmt: skip
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, float]]:
    """(exit status, stderr, seconds to exit from now) of each process; none is left behind."""
    t0, out = time.monotonic(), []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            out.append((p.returncode, err, time.monotonic() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _pair(args: list[str]) -> None:
    for rc, err, _ in _finish(_spawn_pair(args)):
        assert rc == 0, err[-3000:]


def _wait_for_checkpoint(out: Path, step: int, procs: list[subprocess.Popen]) -> None:
    marker = out / "checkpoints" / str(step) / checkpoint.COMMIT_MARKER
    deadline = time.monotonic() + 300
    while not marker.is_file():
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
        assert time.monotonic() < deadline, f"checkpoint {step} never committed"
        time.sleep(0.05)


PAIR = ("--mesh", "fsdp=2", "--heartbeat-timeout", "20")


@pytest.fixture(scope="module")
def pair_ref(tmp_path_factory: pytest.TempPathFactory, corpus: Path, cache: Path) -> list:
    """20 steps of an unbroken two-process run (fsdp=2, one device each)."""
    out = tmp_path_factory.mktemp("pair") / "run"
    _pair(_args(corpus, out, cache, 20, *PAIR))
    return _rows(out)


def test_two_processes_resume_with_two_and_with_one(
    tmp_path: Path, corpus: Path, cache: Path, pair_ref
) -> None:
    out = tmp_path / "run"
    _pair(_args(corpus, out, cache, 10, *PAIR))
    saved = out / "checkpoints" / "10" / "state"
    assert {p.name for p in saved.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    _pair(["--resume", "--out", str(out), "--max-steps", "15", "--cache-dir", str(cache)])
    # Then one process (one device) carries on what two wrote.
    _train("--resume", "--out", str(out), "--max-steps", "20", "--mesh", "data=1")
    _same_rows(_rows(out), pair_ref, MESH_RTOL)


def test_lost_process_stops_the_other_and_both_resume(
    tmp_path: Path, corpus: Path, cache: Path, pair_ref
) -> None:
    out = tmp_path / "run"
    procs = _spawn_pair(_args(corpus, out, cache, 20, *PAIR))
    _wait_for_checkpoint(out, 5, procs)
    procs[1].send_signal(signal.SIGKILL)  # a lost host
    (rc, err, seconds), (killed, _, _) = _finish(procs, timeout=180)
    assert killed == -signal.SIGKILL
    # The survivor stops by itself: a quarter of the heartbeat timeout (5 s) after the last beat.
    assert rc == runguard.PEER_LOST_EXIT, err[-3000:]
    assert seconds < 60, seconds  # the bar is 180 s
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: process 0 lost process 1 of 2 (no sign of life")
    assert f"--resume --out {out} (each with its process flags)" in last, last
    assert "Traceback" not in err
    newest = checkpoint.list_steps(out)[-1]
    assert newest >= 5 and f"last committed checkpoint: {out / 'checkpoints' / str(newest)}" in last
    _pair(["--resume", "--out", str(out), "--cache-dir", str(cache)])
    _same_rows(_rows(out), pair_ref, MESH_RTOL)


def test_sigterm_to_one_process_stops_both_at_one_step(
    tmp_path: Path, corpus: Path, cache: Path, pair_ref
) -> None:
    out = tmp_path / "run"
    procs = _spawn_pair(_args(corpus, out, cache, 20, *PAIR))
    _wait_for_checkpoint(out, 5, procs)
    procs[0].send_signal(signal.SIGTERM)  # preemption notice on one host: JAX tells the other
    results = _finish(procs, timeout=180)
    steps = []
    for rc, err, _ in results:
        assert rc == 128 + signal.SIGTERM, err[-3000:]
        last = err.strip().splitlines()[-1]
        steps.append(int(last.split("after step ")[1].split(";")[0]))
    assert steps[0] == steps[1] and checkpoint.list_steps(out)[-1] == steps[0]
    _pair(["--resume", "--out", str(out), "--cache-dir", str(cache)])
    _same_rows(_rows(out), pair_ref, MESH_RTOL)
