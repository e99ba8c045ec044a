"""What the layer switches buy, measured without running a step (so it works on a CPU):
compile time of the train step with unrolled vs scanned layers, and the compiled step's peak
temporary memory (XLA's memory analysis) with and without rematerialisation.

    python benchmarks/accel_cpu.py                     # gpt2-xl compile, gpt2 memory
    python benchmarks/accel_cpu.py --compile-model gpt2 --skip-memory
    python benchmarks/accel_cpu.py --scan-line 2,4,12 --out benchmarks/results/scan_line.json

`--scan-line` finds where scanning the layers starts to pay on this backend: for each depth
(the model's width, `--scan-batch` x its context), the train step's compile seconds and its
median step seconds, unrolled and scanned.

Prints one JSON line per result and writes them all to benchmarks/results/accel_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from machine import machine  # benchmarks/machine.py (run as a script: its folder is on sys.path)

from jaxgpt.config import GPTConfig, TrainConfig, get_preset
from jaxgpt.optim import make_optimizer
from jaxgpt.step import init_train_state, make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "accel_cpu.json"


def compiled_step(cfg: GPTConfig, batch: int) -> tuple[float, float, jax.stages.Compiled]:
    """(lower seconds, compile seconds, compiled) of the jitted train step, from shapes only."""
    tx = make_optimizer(TrainConfig(batch_size=batch), 1000)
    state = jax.eval_shape(lambda: init_train_state(cfg, tx, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((batch, cfg.context_length), jnp.int32)
    step = make_train_step(cfg, tx)
    t0 = time.perf_counter()
    lowered = step.lower(state, (ids, ids))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return t1 - t0, time.perf_counter() - t1, compiled


def compile_times(model: str, batch: int) -> list[dict]:
    rows = []
    for scan in (False, True):
        cfg = get_preset(model).replace(scan_layers=scan)
        lower_s, compile_s, _ = compiled_step(cfg, batch)
        rows.append(
            {"what": "compile_time", "model": model, "scan_layers": scan, "batch": batch,
             "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
             "total_s": round(lower_s + compile_s, 2)}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def scan_line(model: str, layers: list[int], batch: int, steps: int = 3) -> list[dict]:
    """Compile and step seconds of the train step, unrolled and scanned, at each depth. The
    timed steps alternate between the two programs, so the machine's noise hits both alike."""
    rows = []
    for n in layers:
        sides = {}
        for scan in (False, True):
            cfg = get_preset(model).replace(n_layers=n, scan_layers=scan)
            lower_s, compile_s, compiled = compiled_step(cfg, batch)
            sides[scan] = (cfg, compiled, round(lower_s + compile_s, 2))
        times = _alternating_step_seconds(
            {scan: (cfg, compiled) for scan, (cfg, compiled, _) in sides.items()}, batch, steps
        )
        for scan, (cfg, _, compile_s) in sides.items():
            rows.append(
                {"what": "scan_line", "model": model, "n_layers": n, "scan_layers": scan,
                 "batch": batch, "seq": cfg.context_length, "compile_s": compile_s,
                 "step_s": round(statistics.median(times[scan]), 3), "steps": steps}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _alternating_step_seconds(sides: dict, batch: int, steps: int) -> dict[object, list[float]]:
    """Seconds of `steps` runs of each side's compiled train step, taking turns, after one
    untimed run each. `sides`: name -> (GPTConfig, compiled step)."""
    tx = make_optimizer(TrainConfig(batch_size=batch), 1000)  # as compiled_step's
    states = {k: init_train_state(cfg, tx, jax.random.key(0)) for k, (cfg, _) in sides.items()}
    times: dict[object, list[float]] = {k: [] for k in sides}
    for i in range(steps + 1):
        for k, (cfg, compiled) in sides.items():
            ids = jnp.zeros((batch, cfg.context_length), jnp.int32)  # (batch, seq)
            t = time.perf_counter()
            states[k], m = compiled(states[k], (ids, ids))
            jax.block_until_ready(m)
            if i:
                times[k].append(time.perf_counter() - t)
    return times


def remat_memory(model: str, batch: int, dtype: str) -> list[dict]:
    rows = []
    for scan in (False, True):
        for remat in ("none", "block", "dots"):
            cfg = get_preset(model).replace(scan_layers=scan, remat=remat, dtype=dtype)
            _, _, compiled = compiled_step(cfg, batch)
            mem = compiled.memory_analysis()
            rows.append(
                {"what": "step_memory", "model": model, "dtype": dtype, "batch": batch,
                 "seq": cfg.context_length, "scan_layers": scan, "remat": remat,
                 "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1),
                 "argument_mib": round(mem.argument_size_in_bytes / 2**20, 1)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--compile-model", default="gpt2-xl")
    p.add_argument("--compile-batch", type=int, default=1)
    p.add_argument("--memory-model", default="gpt2")
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--memory-dtype", default="float32")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--scan-line", metavar="LAYERS", help="comma-separated depths, e.g. 2,4,12")
    p.add_argument("--scan-model", default="book-124m")
    p.add_argument("--scan-batch", type=int, default=2)
    p.add_argument("--scan-steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    info = {**machine(), "backend": jax.default_backend(), "loadavg_start": os.getloadavg()}
    print(json.dumps(info), flush=True)
    rows = [] if args.skip_compile else compile_times(args.compile_model, args.compile_batch)
    if args.scan_line:
        layers = [int(n) for n in args.scan_line.split(",")]
        rows += scan_line(args.scan_model, layers, args.scan_batch, args.scan_steps)
    if not args.skip_memory:
        rows += remat_memory(args.memory_model, args.memory_batch, args.memory_dtype)
    info["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
