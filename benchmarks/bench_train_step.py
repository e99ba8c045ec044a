"""Train-step throughput: jaxgpt's jit step vs the book's PyTorch step, same machine, same run.

Both sides run one AdamW update (lr 4e-4, weight decay 0.1, the book's settings) on the same
batch shape, with dropout as the config says. Repeats alternate between the two frameworks so
machine noise hits both alike. Besides tokens/s, the step's model FLOPs are set against a
float32 matmul measured in the same run (an achievable peak for this machine), a CPU stand-in
for MFU.

    python benchmarks/bench_train_step.py                   # book-124m, batch 2 x 256 (the book)
    python benchmarks/bench_train_step.py --model small --batch-size 8 --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine import machine  # benchmarks/machine.py (run as a script: its folder is on sys.path)

import jaxgpt
from jaxgpt.config import GPTConfig, TrainConfig, get_preset
from jaxgpt.model import count_params
from jaxgpt.optim import make_optimizer
from jaxgpt.train import init_train_state, make_train_step


def step_flops(cfg: GPTConfig, batch: int, seq: int) -> float:
    """Forward + backward FLOPs of one step: 6 N per token for the matmuls (N = non-embedding
    params + the output head), plus attention's 12 L s e per token (PaLM, appendix B)."""
    n_matmul = 12 * cfg.n_layers * cfg.emb_dim**2 + cfg.emb_dim * cfg.vocab_size
    per_token = 6 * n_matmul + 12 * cfg.n_layers * seq * cfg.emb_dim
    return float(per_token * batch * seq)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of an n x n matmul under XLA on this machine (best of reps)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_jax(cfg: GPTConfig, batch: int, seq: int):
    tc = TrainConfig(lr=4e-4, weight_decay=0.1)
    tx = make_optimizer(tc, total_steps=1000)
    step = make_train_step(cfg, tx)
    state = init_train_state(cfg, tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    holder = {"state": state}

    def run() -> None:
        holder["state"], m = step(holder["state"], (x, y))
        m["loss"].block_until_ready()

    return run


def make_torch(cfg: GPTConfig, batch: int, seq: int):
    import torch
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(123)
    model = GPTModel({k: getattr(cfg, k) for k in (
        "vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias"
    )})  # fmt: skip
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)

    def run() -> None:  # the book's calc_loss_batch + train_model_simple body
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()

    return run, torch.__version__, torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="book-124m", help="preset name (default: book-124m)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="default: the preset's context")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per framework")
    ap.add_argument("--quick", action="store_true", help="2 repeats, for a smoke run")
    ap.add_argument("--no-torch", action="store_true", help="time jaxgpt only")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)
    try:
        cfg = get_preset(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq = args.seq or cfg.context_length
    if not 0 < seq <= cfg.context_length or args.batch_size <= 0:
        print(
            f"error: --seq {seq} must be in [1, {cfg.context_length}], batch > 0", file=sys.stderr
        )
        return 2
    repeats = 2 if args.quick else args.repeats
    peak = matmul_peak()

    sides: dict[str, dict] = {}
    t0 = time.perf_counter()
    jax_run = make_jax(cfg, args.batch_size, seq)
    jax_run()  # compile + first step
    sides["jaxgpt"] = {"first_call_s": time.perf_counter() - t0, "times": []}
    runners = {"jaxgpt": jax_run}
    torch_info = None
    if not args.no_torch:
        torch_run, tver, tthreads = make_torch(cfg, args.batch_size, seq)
        t0 = time.perf_counter()
        torch_run()
        sides["torch-book"] = {"first_call_s": time.perf_counter() - t0, "times": []}
        runners["torch-book"] = torch_run
        torch_info = {"version": tver, "threads": tthreads}
    for _ in range(repeats):  # alternate, so drift hits both
        for name, run in runners.items():
            sides[name]["times"].append(_timed(run))

    flops = step_flops(cfg, args.batch_size, seq)
    tokens = args.batch_size * seq
    rows = []
    for name, s in sides.items():
        med = statistics.median(s["times"])
        rows.append({
            "framework": name,
            "step_s_median": med,
            "step_s_min": min(s["times"]),
            "tokens_per_s": tokens / med,
            "model_flops_per_s": flops / med,
            "fraction_of_matmul_peak": flops / med / peak,
            "first_call_s": s["first_call_s"],
        })  # fmt: skip
    result = {
        "benchmark": "train_step",
        **machine(),
        "torch_threads": torch_info and torch_info["threads"],
        "model": args.model,
        "params": count_params(jax.eval_shape(lambda: jaxgpt.init_params(cfg, jax.random.key(0)))),
        "batch_size": args.batch_size,
        "seq": seq,
        "repeats": repeats,
        "matmul_peak_flops": peak,
        "step_flops": flops,
        "results": rows,
    }
    if "torch-book" in sides:
        t = {r["framework"]: r["step_s_median"] for r in rows}
        result["speedup_vs_torch"] = t["torch-book"] / t["jaxgpt"]
    print(f"# {result['cpu']}, {result['cores']} cores, jax {jax.__version__}, "
          f"torch {torch_info and torch_info['version']}; {args.model} "
          f"({result['params'] / 1e6:.1f}M params), batch {args.batch_size} x {seq}")  # fmt: skip
    print(f"{'framework':<12}{'step ms':>10}{'tokens/s':>11}{'GFLOP/s':>10}{'of peak':>9}")
    for r in rows:
        ms, gf = r["step_s_median"] * 1e3, r["model_flops_per_s"] / 1e9
        frac = r["fraction_of_matmul_peak"]
        print(f"{r['framework']:<12}{ms:>10.1f}{r['tokens_per_s']:>11.0f}{gf:>10.1f}{frac:>9.1%}")
    if "speedup_vs_torch" in result:
        print(f"jaxgpt / torch speed ratio: {result['speedup_vs_torch']:.2f}x "
              f"(matmul peak {peak / 1e9:.1f} GFLOP/s)")  # fmt: skip
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
