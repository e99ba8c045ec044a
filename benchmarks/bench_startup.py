"""Start-up and compilation of a training run, per phase, before and after, side by side.

Runs `scripts/train.py` of this tree (and, with `--before PATH`, of another checkout, e.g.
main's) on the runs the issue names, each in a fresh process with an empty compilation cache
(first run) and again with that cache warm (second run), alternating the trees so machine load
hits both alike. Records each run's own `Wall time:` phase line, the compilation it reports
(all of it, and how much overlapped other work), its process wall time (start-up = process
wall - the phases), and compile seconds in steady steps (train phase / steps). Right after
the first (empty-cache) 29M runs, the book's own PyTorch loop for the same model runs
(`book_curve.py --config 29m`'s, in its own process), for the wall-time ratio.

The issue's two bars, from one invocation of this tree with empty caches: book-124m's
compile seconds over its steady step seconds (at most 4), and the 29M loop's wall time,
start-up and compilation included, against the book's PyTorch code (at least 2x).

    python benchmarks/bench_startup.py                            # the bars (this tree only)
    python benchmarks/bench_startup.py --before /tmp/before       # before/after, ~15 min
      (/tmp/before: a checkout before issue 19, e.g. `git worktree add /tmp/before 5a78030`)
    python benchmarks/bench_startup.py --runs book-124m --no-ahead  # + --no-compile-ahead
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT / "tests" / "fixtures" / "the-verdict.txt"
BOOK = [
    "--data", str(VERDICT), "--batch-size", "2", "--lr", "4e-4", "--weight-decay", "0.1",
    "--eval-freq", "5", "--eval-iter", "5", "--start-context", "Every effort moves you",
]  # fmt: skip
RUNS = {
    # The compile bar: book-124m, 2 x 256, 7 steps (the measurement).
    "book-124m": ["--model", "book-124m", *BOOK, "--max-steps", "7"],
    # The book's loop for the 29M model, 5 epochs (benchmarks/book_curve.py --config 29m).
    "book-29m": ["--model", "book-124m", "--emb-dim", "256", "--n-layers", "4", "--n-heads", "4",
                 *BOOK, "--epochs", "5"],
}  # fmt: skip
TORCH_RUN = "book-29m"  # the run the book's PyTorch code is timed against


def parse_wall(stdout: str) -> dict[str, Any]:
    """The run's `Wall time:` line: {"times": {phase: s, "total": s}, "compilation": {...}}."""
    [line] = [ln for ln in stdout.splitlines() if ln.startswith("Wall time: ")]
    phases, _, rest = line.partition(";")
    out: dict[str, Any] = {
        "times": {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", phases)}
    }
    m = re.search(r"compilation ([\d.]+) s, ([\d.]+) s of it overlapped", rest)
    if m:
        out["compilation"] = {"seconds": float(m[1]), "overlapped": float(m[2])}
    return out


def run_train(tree: Path, flags: list[str], cache: Path, extra: list[str]) -> dict[str, Any]:
    """`tree`'s scripts/train.py with `flags` in a fresh process; its whole wall time counted."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        argv = [sys.executable, str(tree / "scripts" / "train.py"), *flags, *extra,
                "--cache-dir", str(cache), "--out", str(Path(out) / "run")]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree)
        wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
    res = parse_wall(done.stdout)
    times = res["times"]
    steps = int(re.search(r"Done after (\d+) steps", done.stdout)[1])
    res.update(wall_s=round(wall, 2), startup_s=round(wall - times["total"], 2), steps=steps)
    res["step_s"] = times.get("train", 0.0) / steps
    res["losses"] = re.findall(r"Train loss ([\d.]+), Val loss ([\d.]+)", done.stdout)
    res["loadavg"] = os.getloadavg()
    return res


def measure(runs: list[str], trees: dict[str, Path], no_ahead: bool) -> dict[str, Any]:
    """For each run: every tree cold, then every tree warm (each tree its own cache)."""
    results: dict[str, Any] = {}
    for name in runs:
        variants = [(t, path, []) for t, path in trees.items()]
        if no_ahead:
            variants.append(("after, --no-compile-ahead", trees["after"], ["--no-compile-ahead"]))
        with tempfile.TemporaryDirectory() as caches:
            for cache_state in ("first run", "second run"):
                for i, (label, tree, extra) in enumerate(variants):
                    cache = Path(caches) / str(i)
                    res = run_train(tree, RUNS[name], cache, extra)
                    results.setdefault(name, {}).setdefault(label, {})[cache_state] = res
                    _show(name, label, cache_state, res)
                if name == TORCH_RUN and cache_state == "first run":
                    results[TORCH_RUN]["torch (book)"] = {"first run": run_book_torch()}
    return results


def run_book_torch() -> dict[str, Any]:
    """The book's PyTorch loop for the 29M model in its own process (start-up counted)."""
    from book_curve import torch_process

    r = torch_process(str(VERDICT), "29m")
    res = {"wall_s": round(r["process_wall_s"], 2), "times": r["times"], "loadavg": os.getloadavg()}
    res["losses"] = [(f"{e['train']:.3f}", f"{e['val']:.3f}") for e in r["evals"]]
    print(f"{TORCH_RUN} | torch (book) | wall {res['wall_s']:.1f} s; load "
          f"{res['loadavg'][0]:.1f}", flush=True)  # fmt: skip
    return res


def _show(name: str, label: str, cache_state: str, r: dict[str, Any]) -> None:
    phases = ", ".join(f"{k} {v:.1f}" for k, v in r["times"].items() if k != "total")
    comp = r.get("compilation")
    overlap = (
        f"; compilation {comp['seconds']:.1f} s, {comp['overlapped']:.1f} overlapped"
        if comp
        else ""
    )
    print(f"{name} | {label} | {cache_state}: wall {r['wall_s']:.1f} s (start-up "
          f"{r['startup_s']:.1f}, {phases}){overlap}; train {r['step_s']:.2f} s/step; "
          f"load {r['loadavg'][0]:.1f}", flush=True)  # fmt: skip


def summarize(results: dict[str, Any]) -> None:
    """Compile seconds in steady steps, every variant against one step time: the median train
    seconds per step of this tree's runs (the step program is the same in every variant; a
    tree before the PhaseTimer fix counted part of each step outside its train phase)."""
    for name, by_label in results.items():
        ref = statistics.median(r["step_s"] for r in by_label["after"].values())
        torch = by_label.pop("torch (book)", None)
        losses = {label: r["first run"]["losses"] for label, r in by_label.items()}
        for label, runs in by_label.items():
            for cache_state, r in runs.items():
                r["compile_in_steps"] = r["times"]["compile"] / ref
                print(f"{name} | {label} | {cache_state}: compile {r['times']['compile']:.1f} s "
                      f"= {r['compile_in_steps']:.1f} steps of {ref:.2f} s; wall "
                      f"{r['wall_s']:.1f} s")  # fmt: skip
        same = len({json.dumps(v) for v in losses.values()}) == 1
        by_label["same_losses"] = same
        print(f"{name}: the same printed losses in every variant: {same}")
        if torch is not None:
            for runs in by_label.values():
                if isinstance(runs, dict):  # each tree's first run against the book's
                    first = runs["first run"]
                    first["vs_torch"] = torch["first run"]["wall_s"] / first["wall_s"]
            by_label["torch (book)"] = torch
    _bars(results)


def _bars(results: dict[str, Any]) -> None:
    """The issue's two bars, for this tree's first (empty-cache) runs."""
    if "book-124m" in results:
        r = results["book-124m"]["after"]["first run"]
        print(f"BAR book-124m 2x256, empty cache: compile {r['times']['compile']:.1f} s = "
              f"{r['compile_in_steps']:.2f} steady steps (bar: at most 4)")  # fmt: skip
    if TORCH_RUN in results and "torch (book)" in results[TORCH_RUN]:
        r = results[TORCH_RUN]["after"]["first run"]
        torch = results[TORCH_RUN]["torch (book)"]["first run"]
        print(f"BAR 29M book loop, empty cache: jaxgpt {r['wall_s']:.1f} s, the book's PyTorch "
              f"{torch['wall_s']:.1f} s: {r['vs_torch']:.2f}x (bar: at least 2x)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", type=Path, help="another checkout to run side by side (before)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated: {', '.join(RUNS)}")
    p.add_argument("--no-ahead", action="store_true", help="also this tree --no-compile-ahead")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import machine

    trees = {"after": ROOT} if args.before is None else {"before": args.before, "after": ROOT}
    info = {**machine(), "loadavg_start": os.getloadavg()}
    if args.before is not None:
        info["before"] = _commit(args.before)
    info["after"] = _commit(ROOT)
    print(f"# {info['cpu']} ({', '.join(info['vector_extensions'])}), {info['cores']} cores; "
          f"load {info['loadavg_start']}")  # fmt: skip
    results = measure(args.runs.split(","), trees, args.no_ahead)
    summarize(results)
    info["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "runs": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() or f"{tree} (not a git checkout)"


if __name__ == "__main__":
    sys.exit(main())
