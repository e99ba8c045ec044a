"""The sharded path's cost: today's one-device step vs the same step on a mesh, same run.

One device: `make_train_step` unsharded (host batches passed as they are, as `fit` does)
against `--mesh data=1` (state placed with shardings, batches through `put_batch`).
Simulated devices (`--devices N`, each in its own process): `data=N`, `fsdp=N` (parameters
gathered block by block) and, for N = 8, `data=2,fsdp=4` against `data=1` in that process; on
a 2-core CPU no speed-up is possible, so this shows the machinery's (and FSDP's
collectives') overhead. Repeats alternate the variants.

    python benchmarks/bench_mesh.py                        # small, batch 8: 1, 2 and 8 devices
    python benchmarks/bench_mesh.py --devices 8 --child    # one process's figures only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _variants(model: str, batch: int, meshes: list[str | None]) -> dict[str, Any]:
    import jax
    import numpy as np

    from jaxgpt.config import TrainConfig, get_preset
    from jaxgpt.optim import make_optimizer
    from jaxgpt.step import mesh_train_step

    cfg = get_preset(model)
    tx = make_optimizer(TrainConfig(lr=4e-4), 1000)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, cfg.context_length + 1)).astype(np.int32)
    host = (ids[:, :-1], ids[:, 1:])  # (batch, seq) each
    out = {}
    for spec in meshes:
        state, step, put = mesh_train_step(cfg, tx, jax.random.key(0), spec)
        state, m = step(state, put(host))  # compile
        jax.block_until_ready(m)
        out[str(spec)] = [state, step, put]
    return out, host


def measure(model: str, batch: int, meshes: list[str | None], steps: int, repeats: int) -> dict:
    """Best and median seconds per step of each variant, repeats alternating."""
    import jax

    variants, host = _variants(model, batch, meshes)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            state, step, put = v
            t = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, put(host))
            jax.block_until_ready((state, m))
            times[name].append((time.perf_counter() - t) / steps)
            v[0] = state
    return {
        name: {"best_s": min(ts), "median_s": statistics.median(ts), "all_s": ts}
        for name, ts in times.items()
    }


def _child(devices: int, args: argparse.Namespace) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    meshes = [None, "data=1"] if devices == 1 else ["data=1", f"data={devices}", f"fsdp={devices}"]
    meshes += ["data=2,fsdp=4"] if devices == 8 else []
    res = measure(args.model, args.batch_size, meshes, args.steps, args.repeats)
    base = res[str(meshes[0])]["median_s"]
    ratios = {str(m): res[str(m)]["median_s"] / base for m in meshes[1:]}
    return {
        "devices": devices, "compare": [str(m) for m in meshes], "results": res,
        "ratio_median": ratios[str(meshes[1])], "ratios_median": ratios,
        "device_kind": jax.devices()[0].device_kind,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--devices", type=int, nargs="*", default=[1, 2, 8])
    p.add_argument("--child", action="store_true", help="measure in this process only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mesh.json"))
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.devices[0], args)))
        return
    rows = []
    for n in args.devices:  # each device count needs its own process
        cmd = [sys.executable, __file__, "--child", "--devices", str(n), "--model", args.model,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--repeats", str(args.repeats)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
        print(json.dumps({k: rows[-1][k] for k in ("devices", "compare", "ratios_median")}))
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine

    result = {
        "benchmark": "mesh", **machine(), "model": args.model, "batch_size": args.batch_size,
        "steps": args.steps, "repeats": args.repeats, "runs": rows, "loadavg": os.getloadavg(),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
