"""Train-step throughput: jaxgpt's jit step (the one `fit` uses) vs the book's PyTorch step.

Per configuration, in one process: jaxgpt's donated, jit-compiled `train_step`; the book's
PyTorch step (`zero_grad / cross_entropy / backward / AdamW.step`, `llms_from_scratch`'s
`GPTModel`); the same with `AdamW(fused=True)`; and optionally with `torch.compile`. Each side
is compiled / warmed up first, then the timed repeats alternate between the sides so machine
noise hits all alike. Reported: median step time and spread, tokens/s, first-call and compile
time, XLA's planned peak memory for the jaxgpt step, and MFU in both conventions
(nanoGPT/PaLM: 6N + 12 L d T FLOPs per token; causal, llm.c/MaxText: 6N + 6 L d T; N = the
parameters that take part in matmuls) against a peak: on CPU the float32 matmul throughput
measured in the same run, on GPU the datasheet figure.

    python benchmarks/bench_train_step.py                          # small 8x128 and book-124m 2x256
    python benchmarks/bench_train_step.py --config gpt2:1 --torch-compile
    python benchmarks/bench_train_step.py --config small:8 --profile   # where the time goes
    python benchmarks/bench_train_step.py --device gpu --batch 16      # benchmarks/gpu_step.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from book_step import make_torch  # the book's PyTorch step (no JAX in its module)
from gpu_step import peak_flops  # one peak table
from machine import machine  # benchmarks/machine.py (run as a script: its folder is on sys.path)

from jaxgpt.config import GPTConfig, TrainConfig, get_preset
from jaxgpt.host import reuse_host_memory
from jaxgpt.optim import make_optimizer
from jaxgpt.plan import flops_per_token, matmul_params  # one FLOP count
from jaxgpt.step import init_train_state, make_train_step

DEFAULT_CONFIGS = ("small:8", "book-124m:2")


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """float32 FLOP/s of an n x n matmul on this machine: XLA's and PyTorch's (best of reps)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    out = {"jax": 2 * n**3 / min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))}
    try:
        import torch

        t = torch.ones(n, n)
        t @ t
        out["torch"] = 2 * n**3 / min(_timed(lambda: t @ t) for _ in range(reps))
    except ImportError:
        pass
    return out


def make_jax(cfg: GPTConfig, batch: int, seq: int) -> tuple[Callable[[], None], dict]:
    """jaxgpt's fit step on random tokens; returns the runner and compile facts."""
    tx = make_optimizer(TrainConfig(lr=4e-4, weight_decay=0.1), total_steps=1000)
    step = make_train_step(cfg, tx)
    state = init_train_state(cfg, tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    t = time.perf_counter()
    compiled = step.lower(state, (x, y)).compile()
    info = {"compile_s": time.perf_counter() - t}
    mem = compiled.memory_analysis()
    if mem is not None:  # XLA's buffer plan: arguments + outputs + temporaries, less aliasing
        info["planned_peak_bytes"] = int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )  # fmt: skip
    holder = {"state": state}

    def run() -> None:
        holder["state"], m = compiled(holder["state"], (x, y))
        m["loss"].block_until_ready()

    return run, info


def bench_config(
    cfg: GPTConfig, name: str, batch: int, seq: int, args: argparse.Namespace, peak: float
) -> dict:
    """Time every side for one configuration; return the JSON record."""
    sides: dict[str, dict] = {}
    runners: dict[str, Callable[[], None]] = {}
    t = time.perf_counter()
    runners["jaxgpt"], info = make_jax(cfg, batch, seq)
    runners["jaxgpt"]()
    sides["jaxgpt"] = {"first_call_s": time.perf_counter() - t, **info}
    if not args.no_torch:
        variants = {"torch-book": (False, False), "torch-fused-adamw": (True, False)}
        if args.torch_compile:
            variants["torch-compile"] = (True, True)
        for side, (fused, comp) in variants.items():
            t = time.perf_counter()
            try:
                runners[side] = make_torch(cfg, batch, seq, fused=fused, compile_model=comp)
                runners[side]()
            except Exception as e:  # torch.compile needs a working C++ toolchain
                print(f"# {side} skipped: {type(e).__name__}: {e}".splitlines()[0])
                runners.pop(side, None)
                continue
            sides[side] = {"first_call_s": time.perf_counter() - t}
    for _ in range(args.warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):  # alternate, so drift hits every side
        for side, run in runners.items():
            times[side].append(_timed(run))
    flops = {c: f * batch * seq for c, f in flops_per_token(cfg, seq).items()}
    rows = []
    for side, ts in times.items():
        med = statistics.median(ts)
        rows.append({
            "framework": side,
            "step_s_median": med,
            "step_s_min": min(ts),
            "step_s_max": max(ts),
            "tokens_per_s": batch * seq / med,
            "mfu_nanogpt": flops["nanogpt"] / med / peak,
            "mfu_causal": flops["causal"] / med / peak,
            **sides[side],
        })  # fmt: skip
    t = {r["framework"]: r["step_s_median"] for r in rows}
    record = {
        "config": name, "batch_size": batch, "seq": seq,
        "matmul_params": matmul_params(cfg), "step_flops_nanogpt": flops["nanogpt"],
        "step_flops_causal": flops["causal"], "results": rows,
        "speedup_vs": {k: v / t["jaxgpt"] for k, v in t.items() if k != "jaxgpt"},
    }  # fmt: skip
    if args.profile:
        from profiling import print_ops, top_ops

        trace, ops = top_ops(runners["jaxgpt"], calls=2)
        print_ops(ops, f"jaxgpt step, {name} {batch}x{seq}; trace in {trace}")
        record["profile"] = {"trace_dir": trace, "top_ops": ops}
    return record


def _print_record(rec: dict) -> None:
    print(f"## {rec['config']}, batch {rec['batch_size']} x {rec['seq']}")
    head = ("side", "step ms", "spread ms", "tokens/s", "MFU nanoGPT", "MFU causal", "first s")
    print("{:<18}{:>10}{:>14}{:>10}{:>13}{:>12}{:>9}".format(*head))
    for r in rec["results"]:
        spread = f"{r['step_s_min'] * 1e3:.0f}-{r['step_s_max'] * 1e3:.0f}"
        print(f"{r['framework']:<18}{r['step_s_median'] * 1e3:>10.0f}{spread:>14}"
              f"{r['tokens_per_s']:>10.0f}{r['mfu_nanogpt']:>13.1%}{r['mfu_causal']:>12.1%}"
              f"{r['first_call_s']:>9.1f}")  # fmt: skip
    jx = next(r for r in rec["results"] if r["framework"] == "jaxgpt")
    extra = f"jaxgpt compile {jx['compile_s']:.1f} s"
    if "planned_peak_bytes" in jx:
        extra += f", XLA planned peak {jx['planned_peak_bytes'] / 2**20:.0f} MiB"
    ratios = ", ".join(f"{v:.2f}x {k}" for k, v in rec["speedup_vs"].items())
    print(f"{extra}; jaxgpt speed = {ratios}")


def _parse_configs(specs: list[str]) -> list[tuple[str, GPTConfig, int, int]]:
    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        batch, _, seq = rest.partition("x")
        cfg = get_preset(name)
        b, s = int(batch or 1), int(seq or cfg.context_length)
        if not (0 < s <= cfg.context_length and b > 0):
            ctx = cfg.context_length
            raise ValueError(f"--config {spec!r}: need batch > 0 and seq in [1, {ctx}]")
        out.append((name, cfg, b, s))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", metavar="PRESET:BATCH[xSEQ]",
                    help=f"repeatable (default: {' '.join(DEFAULT_CONFIGS)})")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side after the first")
    ap.add_argument("--no-torch", action="store_true", help="time jaxgpt only")
    ap.add_argument("--torch-compile", action="store_true", help="add torch.compile (slow start)")
    ap.add_argument("--profile", action="store_true", help="trace jaxgpt's step; print top ops")
    ap.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is; by default it is tuned as "
        "scripts/train.py tunes it (host.reuse_host_memory), process-wide, so every "
        "side shares it",
    )
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: gpt2 124M in bf16, each accelerator switch on and off "
                    "(benchmarks/gpu_step.py; its own flags follow)")  # fmt: skip
    args, rest = ap.parse_known_args(argv)
    if args.device == "gpu":
        import gpu_step

        return gpu_step.main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        configs = _parse_configs(args.config or list(DEFAULT_CONFIGS))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Before machine(): the first JAX call starts the worker threads that pick malloc arenas.
    malloc = "glibc default" if args.system_malloc or not reuse_host_memory() else "reuse"
    mach = machine()
    gpu = jax.default_backend() == "gpu"
    if gpu:
        kind = mach["jax_device"]
        peak = peak_flops(kind)
        if peak is None:
            print(f"error: no datasheet peak for {kind!r}; add it to gpu_step.PEAK_BF16")
            return 2
        peak_info = {"source": "datasheet bf16", "flops": peak}
    else:
        measured = cpu_matmul_peak()
        peak = measured["jax"]
        peak_info = {"source": "measured fp32 2048^2 matmul, XLA", "flops": peak,
                     "torch_flops": measured.get("torch")}  # fmt: skip
    print(f"# {mach['cpu']} ({', '.join(mach['vector_extensions']) or 'no AVX'}), "
          f"{mach['cores']} cores; jax {mach['versions']['jax']}, torch {mach['versions']['torch']}"
          f"; peak {peak / 1e9:.0f} GFLOP/s ({peak_info['source']}); malloc: {malloc}")  # fmt: skip
    records = []
    for name, cfg, b, s in configs:
        rec = bench_config(cfg, name, b, s, args, peak)
        _print_record(rec)
        records.append(rec)
    if not gpu:  # a busy moment during the first peak measurement would inflate every MFU
        again = cpu_matmul_peak()["jax"]
        if again > peak:
            print(f"# peak re-measured after the steps: {again / 1e9:.0f} GFLOP/s; MFU rescaled")
            for rec in records:
                for r in rec["results"]:
                    r["mfu_nanogpt"] *= peak / again
                    r["mfu_causal"] *= peak / again
            peak_info["flops"] = peak = again
    result = {
        "benchmark": "train_step", **mach, "peak": peak_info, "host_malloc": malloc,
        "repeats": args.repeats,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "configs": records,
    }  # fmt: skip
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
