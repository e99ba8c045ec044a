"""Host memory: peak RSS of jaxgpt's training run against the book's PyTorch step, side by side.

Each side runs in a fresh process, one at a time, and its peak resident set is the kernel's
(`os.wait4`'s ru_maxrss of that child); /proc/PID/status is also sampled every 0.2 s for a
timeline. jaxgpt: `scripts/train.py --model M --batch-size B --max-steps S` as a user runs it
(corpus, evaluations, sample, checkpoint), by default its first run (an empty compilation
cache); the book: `llms_from_scratch.ch04.GPTModel` + AdamW, S steps of the same model and
batch. The planner's one-device `peak` (`train.py --plan`) is recorded next to them.

    python benchmarks/bench_memory.py                    # gpt2, batch 2: default, warm, no-reuse
    python benchmarks/bench_memory.py --runs default torch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
# run -> (extra train.py flags, the compilation cache: "fresh" or "warm" (a first run fills it))
RUNS: dict[str, tuple[list[str], str]] = {
    "default": ([], "fresh"),
    "warm": ([], "warm"),
    "no-reuse": (["--no-reuse-host-memory"], "fresh"),
}


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], limit: float = float("inf")) -> dict[str, Any]:
    """Run `cmd` to the end; its peak RSS (bytes), wall seconds and an RSS timeline. A run
    whose RSS passes `limit` bytes is killed (the machine is shared): "killed" says so."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.set_blocking(proc.stdout.fileno(), False)
    timeline, out, killed = [], b"", False
    while True:
        waited, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if waited:
            break
        timeline.append((round(time.monotonic() - t0, 1), _rss_kib(proc.pid) * 1024))
        if timeline[-1][1] > limit and not killed:
            proc.kill()
            killed = True
        out += proc.stdout.read() or b""
        time.sleep(0.2)
    out += proc.stdout.read() or b""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode and not killed:
        raise RuntimeError(f"{cmd} exited {proc.returncode} (RSS limit {limit / 2**30:.1f} GiB)"
                           f":\n{out.decode()[-3000:]}")  # fmt: skip
    return {
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
        "killed": killed,
        "wall_s": round(time.monotonic() - t0, 1),
        "timeline": timeline[:: max(1, len(timeline) // 200)],  # ~200 points
        "output_tail": out.decode(errors="replace").splitlines()[-6:],
    }


def _train_cmd(args: argparse.Namespace, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(TRAIN), "--model", args.model, "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps), "--cache-dir", str(cache), "--out", str(out), *extra,
    ]  # fmt: skip


def run_jaxgpt(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One run of train.py; "warm" takes the cache the "default" run filled, if it ran."""
    flags, cache_state = RUNS[name]
    cache = tmp / f"cache-{name}"
    limit = args.kill_above * 2**30
    if cache_state == "warm" and (tmp / "cache-default").exists():
        cache = tmp / "cache-default"
    elif cache_state == "warm":  # a first run fills the cache (and tokenises the corpus)
        measure(_train_cmd(args, cache, tmp / f"fill-{name}", *flags), limit)
    return measure(_train_cmd(args, cache, tmp / f"run-{name}", *flags), limit)


def run_torch(args: argparse.Namespace) -> dict[str, Any]:
    from jaxgpt.config import get_preset  # the parent may load JAX; the child never does

    fields = get_preset(args.model).to_dict()
    child = [sys.executable, __file__, "--torch-child", json.dumps(fields),
             "--batch-size", str(args.batch_size), "--steps", str(args.steps)]  # fmt: skip
    return measure(child, args.kill_above * 2**30)


def torch_child(fields: dict[str, Any], batch: int, steps: int) -> None:
    """The book's step, `steps` times, in this process (no JAX imported)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).parent))
    from book_step import make_torch

    cfg = SimpleNamespace(**fields)
    run = make_torch(cfg, batch, cfg.context_length, fused=False, compile_model=False)
    for _ in range(steps):
        run()


def plan_peak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The planner's figures for the same run on one CPU device."""
    path = tmp / "plan.json"
    cmd = _train_cmd(args, tmp / "cache-plan", tmp / "plan-run", "--plan", "--plan-json", str(path))
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return json.loads(path.read_text())["per_device_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--runs", nargs="*", default=[*RUNS, "torch"], choices=[*RUNS, "torch"])
    p.add_argument("--kill-above", type=float, default=20.0, help="GiB of RSS that end a run")
    p.add_argument("--torch-child", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = p.parse_args()
    if args.torch_child:
        torch_child(json.loads(args.torch_child), args.batch_size, args.steps)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for name in args.runs:  # one at a time: each peak is a process of its own
            results[name] = (
                run_torch(args) if name == "torch" else run_jaxgpt(name, args, Path(tmp))
            )
            print(json.dumps({name: results[name]["peak_rss_bytes"] / 2**30, "unit": "GiB"}))
        plan = plan_peak(args, Path(tmp))
    gib = {k: round(v["peak_rss_bytes"] / 2**30, 2) for k, v in results.items()}
    summary = {"peak_rss_gib": gib, "plan_peak_gib": round(plan["peak"] / 2**30, 2)}
    if "torch" in gib:
        summary["ratio_to_torch"] = {k: round(v / gib["torch"], 3) for k, v in gib.items()}
    summary["rss_over_plan_peak"] = {
        k: round(v["peak_rss_bytes"] / plan["peak"], 3) for k, v in results.items() if k != "torch"
    }
    print(json.dumps(summary))
    record = {
        "benchmark": "memory", **machine(), "model": args.model, "batch_size": args.batch_size,
        "steps": args.steps, "loadavg": os.getloadavg(), **summary, "plan_bytes": plan,
        "runs": results,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
