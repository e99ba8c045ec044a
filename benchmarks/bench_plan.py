"""The planner's memory table: `train.py --plan` for big models on N simulated devices, each
mesh in a fresh process (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).

Per device: parameters, optimizer state, XLA's arguments / temporaries / peak of the train
step, and each mesh's peak as a fraction of the data-parallel one (the issue's bar: fsdp=8 at
most 35% of data=8 for gpt2-medium, `--scan-layers --remat block`, batch 16 x 1024).

    python benchmarks/bench_plan.py                      # gpt2-medium and gpt2-xl on 8 devices
    python benchmarks/bench_plan.py --models gpt2-medium --meshes data=8 fsdp=8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--scan-layers", "--remat", "block"]


def plan(model: str, mesh: str, devices: int, batch: int, tmp: Path) -> dict[str, Any]:
    """One plan, in a process of its own with `devices` simulated CPU devices."""
    out = tmp / f"{model}-{mesh}.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--model", model, *FLAGS,
           "--batch-size", str(batch), "--mesh", mesh, "--plan", "--plan-json", str(out),
           "--no-compile-cache", "--out", str(tmp / "never-written")]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="*", default=["gpt2-medium", "gpt2-xl"])
    p.add_argument("--meshes", nargs="*", default=["data=8", "fsdp=8", "data=2,fsdp=4"])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan.json"))
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        for model in args.models:
            base = None
            for mesh in args.meshes:
                r = plan(model, mesh, args.devices, args.batch_size, Path(tmp))
                base = base or r["per_device_bytes"]["peak"]  # the first mesh: the reference
                row = {"model": model, "mesh": mesh, "flags": FLAGS, **r,
                       "peak_over_first": r["per_device_bytes"]["peak"] / base}  # fmt: skip
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("model", "mesh", "peak_over_first")}))
    record = {"benchmark": "plan", **machine(), "devices": args.devices,
              "batch_size": args.batch_size, "loadavg": os.getloadavg(), "plans": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
