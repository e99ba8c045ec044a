"""Everything that can only be learned on an accelerator, in one command, in at most 8 minutes.

In order: the `gpu`-marked tests; the parity suite against PyTorch with jaxgpt on the device;
the train-step benchmark for `small`, `book-124m` and `gpt2` (context 1024) in float32, bf16
and bf16 + cuDNN attention + scanned layers, with MFU against the datasheet peak; the sampling
benchmark; the planner's memory next to the memory the same step measures on the device.
Each step runs in its own process under its own time limit; one that fails or runs out of time
is recorded as such and the next runs. Writes `benchmarks/results/device_<device>.json` and
prints a table.

    python benchmarks/device_check.py             # on the borrowed GPU (see docs/device-check.md)
    python benchmarks/device_check.py --dry-run   # the plan: steps, commands, time budget
    python benchmarks/device_check.py --smoke     # the same steps shrunk to seconds (any machine)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 480  # the 8 minutes on one GPU
# The step benchmark's variants (benchmarks/gpu_step.py VARIANTS) and batches per model.
# fp32 (TF32), bf16, bf16 + cuDNN + scan; then bf16 scanned with XLA attention, against bf16
# unrolled: whether scanning compiles faster without slowing the step on this device.
STEP_VARIANTS = "float32,attention_xla,cudnn_scan,xla_scan"
STEP_MODELS = {"small": 64, "book-124m": 32, "gpt2": 16}  # rows per step at the preset's context
PLAN_MODEL, PLAN_BATCH = "gpt2", 16  # the planner's memory against the measured, bf16 + XLA


@dataclass
class Step:
    """One thing to learn: a command, its time limit, where its JSON result lands."""

    name: str
    what: str
    argv: list[str]
    budget_s: int
    result: Path | None = None
    needs: list[str] = field(default_factory=list)  # flags the command must know, else skipped


def plan(out: Path, smoke: bool) -> list[Step]:
    """The steps in the order they run; `smoke`: tiny sizes, for a CPU."""
    py, bench = sys.executable, ROOT / "benchmarks"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    steps = [
        Step("gpu tests", "tests marked gpu: cuDNN attention, switches on the GPU vs the CPU",
             [*pytest, "-m", "gpu", "-rs", str(ROOT / "tests")], 60),
        Step("parity", "logits, gradients, training and round trips against PyTorch, jaxgpt on "
             "the device", [*pytest, str(ROOT / "tests" / "parity")] + (["-k", "tiny"] if smoke
             else []), 75),
    ]  # fmt: skip
    models = {"tiny": 2} if smoke else STEP_MODELS
    for model, batch in models.items():
        steps.append(Step(
            f"step {model}", f"train step, {model} x{batch}: {STEP_VARIANTS}, MFU vs datasheet",
            [py, str(bench / "gpu_step.py"), "--model", model, "--batch", str(batch),
             "--variants", STEP_VARIANTS, "--steps", "2" if smoke else "10",
             "--warmup", "1" if smoke else "3", "--out", str(out / f"step_{model}.json")],
            {"small": 45, "book-124m": 75, "gpt2": 105, "tiny": 60}[model],
            out / f"step_{model}.json",
        ))  # fmt: skip
    sample = ["--model", "tiny", "--quick"] if smoke else ["--repeats", "2", "--new-tokens", "64"]
    steps.append(Step(
        "sampling", "decoding tokens/s, batch 1 and 8, vs transformers",
        [py, str(bench / "bench_sampling.py"), "--batches", "1,8", "--book-repeats", "0",
         *sample, "--out", str(out / "sampling.json")],
        60, out / "sampling.json",
    ))  # fmt: skip
    model, batch = ("tiny", 2) if smoke else (PLAN_MODEL, PLAN_BATCH)
    steps.append(Step(
        "planner", f"the planner's per-device memory for {model} x{batch} (bf16, XLA attention)",
        [py, str(ROOT / "scripts" / "train.py"), "--plan", "--plan-json",
         str(out / "plan.json"), "--model", model, "--batch-size", str(batch), "--dtype",
         "bfloat16", "--attention", "xla", "--drop-rate", "0", "--vocab-pad", "64"],
        30, out / "plan.json", needs=["--plan", "--plan-json"],
    ))  # fmt: skip
    steps.append(Step(
        "measured", f"the same step's memory measured on the device ({model} x{batch})",
        [py, str(bench / "gpu_step.py"), "--model", model, "--batch", str(batch),
         "--variants", "attention_xla", "--steps", "2", "--warmup", "1",
         "--out", str(out / "measured.json")],
        30, out / "measured.json",
    ))  # fmt: skip
    return steps


def _missing_flags(step: Step) -> list[str]:
    """Flags of `step.needs` its command's --help does not list (another issue builds them)."""
    if not step.needs:
        return []
    help_text = subprocess.run(
        [*step.argv[:2], "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    ).stdout
    return [f for f in step.needs if not re.search(rf"{re.escape(f)}\b", help_text)]


def run_step(step: Step) -> dict[str, Any]:
    """Run one step under its time limit: status, seconds, output tail, its JSON result."""
    missing = _missing_flags(step)
    if missing:
        return {"status": "skipped", "why": f"{step.argv[1]} has no {' '.join(missing)} yet"}
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            step.argv, capture_output=True, text=True, timeout=step.budget_s, cwd=ROOT, env=env
        )
        status, tail = ("ok" if done.returncode == 0 else f"exit {done.returncode}"), done.stdout
        tail += done.stderr if done.returncode else ""
    except subprocess.TimeoutExpired as e:
        status, tail = f"timed out after {step.budget_s} s", _text(e.stdout) + _text(e.stderr)
    row: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
    row["output_tail"] = tail[-3000:]
    if step.result is not None and step.result.is_file():
        row["result"] = json.loads(step.result.read_text())
    elif rows := _json_rows(tail):  # cut short: the rows it printed before the limit
        row["result"] = {"results": rows}
    return row


def _json_rows(text: str) -> list[dict[str, Any]]:
    """The one-line JSON results (with a "variant") a benchmark printed."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{") and '"variant"' in line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def summary(name: str, row: dict[str, Any]) -> str:
    """The figures of one step for the table."""
    res, tail = row.get("result"), row.get("output_tail", "")
    if name.startswith("step") and res:
        cells = []
        for r in res.get("results", []):
            if "error" in r:
                cells.append(f"{r['variant']}: {r['error'][:40]}")
            else:
                mfu = r.get("mfu_causal")
                cells.append(f"{r['variant']} {r['tokens_per_s']:,} tok/s"
                             + (f" MFU {mfu:.0%}" if mfu is not None else "")
                             + f" (compile {r['compile_s']} s)")  # fmt: skip
        return "; ".join(cells)
    if name == "sampling" and res:
        return "; ".join(
            f"batch {r['batch']} {r['jaxgpt']['tokens_per_s']:.0f} tok/s" for r in res["results"]
        )
    if name in ("planner", "measured") and res:
        return _memory(name, res)
    counts = re.findall(r"(\d+ (?:passed|failed|skipped|error|deselected))", tail)
    return ", ".join(counts) or row.get("why", "")


def _memory(name: str, res: dict[str, Any]) -> str:
    if name == "planner":
        per = res.get("per_device_bytes", {})
        return f"planned peak {per.get('peak', 0) / 2**20:,.0f} MiB per device"
    r = res["results"][0]
    if "error" in r:
        return r["error"][:60]
    compiled = r["compiled_args_mib"] + r["compiled_temp_mib"]
    return (f"XLA args + temps {compiled:,.0f} MiB; device peak "
            f"{r['device_peak_mib_so_far']} MiB")  # fmt: skip


def _device_name() -> str:
    import jax

    kind = str(jax.devices()[0].device_kind)
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on a CPU")
    p.add_argument("--out", type=Path, help="result JSON (default: results/device_<device>.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        work = Path(tempfile.gettempdir()) / "jaxgpt-device-check-XXXX"
    else:
        work = Path(tempfile.mkdtemp(prefix="jaxgpt-device-check-"))
    steps = plan(work, args.smoke)
    total = sum(s.budget_s for s in steps)
    print(f"device check: {len(steps)} steps, time budget {total} s (at most {BUDGET_S} s)")
    for i, s in enumerate(steps, 1):
        print(f"{i}. {s.name} ({s.budget_s} s): {s.what}\n   $ {' '.join(s.argv)}")
    if args.dry_run:
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import machine

    report: dict[str, Any] = {"machine": machine(), "budget_s": total, "steps": {}}
    start = time.perf_counter()
    for s in steps:
        print(f"\n== {s.name}", flush=True)
        report["steps"][s.name] = row = run_step(s)
        print(f"{row['status']} in {row.get('seconds', 0)} s: {summary(s.name, row)}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or RESULTS / f"device_{_device_name()}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("\n| step | status | s | figures |\n|---|---|---|---|")
    for name, row in report["steps"].items():
        print(f"| {name} | {row['status']} | {row.get('seconds', '-')} | {summary(name, row)} |")
    print(f"total {report['seconds']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
