"""Train-step speed on an accelerator, each switch on and off: `gpt2` (124M, ctx 1024) in bf16.

For every variant: compile time, tokens/s (median of timed steps), MFU in both conventions
against the device's datasheet bf16 peak, and peak device memory. The baseline is every
switch on that helps speed (bf16, fused attention "auto", no remat, no scan, padded vocab where
the config has it, dropout 0); each other variant flips one switch.

    python benchmarks/gpu_step.py                        # on a GPU: writes results/gpu_step.json
    python benchmarks/gpu_step.py --model tiny --batch 2 --steps 2 --variants base  # CPU smoke

`bench_train_step.py --device gpu` runs this module. Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from machine import machine  # benchmarks/machine.py (run as a script: its folder is on sys.path)

from jaxgpt.config import GPTConfig, TrainConfig, get_preset
from jaxgpt.optim import make_optimizer
from jaxgpt.plan import flops_per_token
from jaxgpt.step import init_train_state, make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_step.json"
# Datasheet dense bf16 tensor-core peaks, FLOP/s (no sparsity): matched against device_kind.
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10": 125e12}
# name -> GPTConfig changes against the baseline; "drop" variants also train with dropout.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "float32": {"dtype": "float32", "matmul_precision": "default"},  # TF32 matmuls
    "attention_book": {"attention": "book"},
    "attention_xla": {"attention": "xla"},
    "attention_cudnn": {"attention": "cudnn"},
    "dropout_0.1_auto": {"drop_rate": 0.1},  # auto falls back to the book's path
    "dropout_0.1_cudnn": {"drop_rate": 0.1, "attention": "cudnn"},  # no attention dropout
    "scan_layers": {"scan_layers": True},
    "remat_block": {"remat": "block"},
    "remat_dots": {"remat": "dots"},
    "scan_remat_block": {"scan_layers": True, "remat": "block"},
    "cudnn_scan": {"attention": "cudnn", "scan_layers": True},  # device_check's fastest guess
    "xla_scan": {"attention": "xla", "scan_layers": True},  # against attention_xla: the scan line
    "vocab_pad_off": {"vocab_pad": 1},
}


def peak_flops(device_kind: str) -> float | None:
    """The datasheet bf16 peak of a device name such as "NVIDIA H100 80GB HBM3", or None."""
    for name, flops in PEAK_BF16.items():
        if name in device_kind:
            return flops
    return None


def base_config(model: str) -> GPTConfig:
    """The baseline: bf16 activations, default (fast) matmul precision, fused attention."""
    cfg = get_preset(model).replace(
        dtype="bfloat16", matmul_precision="default", attention="auto", drop_rate=0.0
    )
    if "vocab_pad" in {f.name for f in dataclasses.fields(GPTConfig)}:
        cfg = cfg.replace(vocab_pad=64)
    return cfg


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_variant(cfg: GPTConfig, batch: int, grad_accum: int, steps: int, warmup: int) -> dict:
    """Compile and time `steps` train steps of `cfg` on random tokens; one result row."""
    tc = TrainConfig(batch_size=batch, grad_accum=grad_accum, lr=6e-4, weight_decay=0.1)
    tx = make_optimizer(tc, 1000)
    step = make_train_step(cfg, tx, grad_accum)
    state = init_train_state(cfg, tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    seq = cfg.context_length
    x, y = (jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32) for _ in "xy")
    t0 = time.perf_counter()
    compiled = step.lower(state, (x, y)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = compiled(state, (x, y))
        float(m["loss"])  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = batch * seq
    row = {
        "batch": batch, "grad_accum": grad_accum, "seq": seq, "compile_s": round(compile_s, 2),
        "step_ms": round(1e3 * step_s, 2),
        "step_ms_spread": [round(1e3 * min(times), 2), round(1e3 * max(times), 2)],
        "tokens_per_s": round(tokens / step_s), "loss": float(m["loss"]),
        "compiled_temp_mib": round(mem.temp_size_in_bytes / 2**20, 1),
        "compiled_args_mib": round(mem.argument_size_in_bytes / 2**20, 1),
    }  # fmt: skip
    peak = peak_flops(str(jax.devices()[0].device_kind))
    for name, fpt in flops_per_token(cfg, seq).items():
        row[f"tflops_{name}"] = round(fpt * tokens / step_s / 1e12, 1)
        row[f"mfu_{name}"] = None if peak is None else round(fpt * tokens / step_s / peak, 4)
    device_peak = _device_peak_bytes()
    row["device_peak_mib_so_far"] = None if device_peak is None else round(device_peak / 2**20)
    del state
    return row


def largest_batch(cfg: GPTConfig, candidates: list[int]) -> int:
    """The largest candidate batch whose train step compiles and runs (out-of-memory: smaller)."""
    for batch in sorted(candidates, reverse=True):
        try:
            run_variant(cfg, batch, 1, steps=1, warmup=0)
            return batch
        except Exception as err:  # XlaRuntimeError RESOURCE_EXHAUSTED, or a compile failure
            if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                raise
    raise RuntimeError(f"no batch in {candidates} fits on {jax.devices()[0].device_kind}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch", type=int, help="rows per step (default: largest that fits)")
    p.add_argument("--batches", default="64,48,32,24,16,12,8,4", help="candidates to search")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    base = base_config(args.model)
    kind = str(jax.devices()[0].device_kind)
    info = {**machine(), "backend": jax.default_backend(), "model": args.model,
            "base": base.to_dict(), "peak_bf16_flops": peak_flops(kind)}  # fmt: skip
    print(json.dumps(info), flush=True)
    batch = args.batch or largest_batch(base, [int(b) for b in args.batches.split(",")])
    rows = []
    for name in args.variants.split(","):
        changes = VARIANTS[name]
        if not set(changes) <= fields:
            continue  # a switch this version of GPTConfig lacks
        cfg = base.replace(**changes)
        try:
            row = run_variant(cfg, batch, args.grad_accum, args.steps, args.warmup)
        except Exception as err:  # one variant failing (e.g. OOM at this batch) is a result
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        rows.append({"variant": name, "changes": changes, **row})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
