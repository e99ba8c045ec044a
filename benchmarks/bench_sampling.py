"""Sampling speed: jaxgpt's cached `generate` vs the book's `generate` vs `transformers`.

Tokens per second for greedy decoding of `--new-tokens` tokens from a short prompt, at batch 1
and batch 8, on random weights of the `gpt2` (124M) config, all three in the same run with
alternating repeats. Also measures memory bandwidth, so batch-1 decoding can be reported as a
fraction of the bandwidth floor (every fp32 weight read once per token), and the compile time.

  python benchmarks/bench_sampling.py            # full run, a few minutes on 2 cores
  python benchmarks/bench_sampling.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from machine import machine  # benchmarks/machine.py (run as a script: its folder is on sys.path)

from jaxgpt.config import GPTConfig, get_preset
from jaxgpt.model import count_params, init_params
from jaxgpt.sampling import generate

PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sampling.json"


def bandwidth_gb_s(n_bytes: int = 1 << 29, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth: best of numpy's sum (1 thread) and torch's sum (all threads), and copy."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    res = {}

    def best(fn: Callable[[], Any], nbytes: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    res["numpy_sum"] = best(lambda: a.sum(), a.nbytes)
    res["numpy_copy"] = best(lambda: np.copyto(b, a), 2 * a.nbytes)  # read + write
    try:
        import torch

        t = torch.from_numpy(a)
        res["torch_sum"] = best(lambda: t.sum(), a.nbytes)
    except ImportError:
        pass
    res["read"] = max(res["numpy_sum"], res.get("torch_sum", 0.0))
    return res


def jaxgpt_runner(config: GPTConfig, batch: int, n_new: int) -> Callable[[], int]:
    params = init_params(config, jax.random.key(0))
    prompts = [PROMPT] * batch

    def run() -> int:
        out = generate(params, config, prompts, n_new)
        return sum(len(o) - len(PROMPT) for o in out)

    return run


def book_runner(config: GPTConfig, batch: int, n_new: int) -> Callable[[], int] | None:
    try:
        import torch
        from llms_from_scratch.ch04 import GPTModel
        from llms_from_scratch.ch05 import generate as book_generate
    except ImportError:
        return None
    torch.manual_seed(0)
    cfg = {k: getattr(config, k) for k in ("vocab_size", "context_length", "emb_dim", "n_heads")}
    cfg |= {"n_layers": config.n_layers, "drop_rate": 0.0, "qkv_bias": config.qkv_bias}
    model = GPTModel(cfg).eval()
    idx = torch.tensor([PROMPT] * batch)

    def run() -> int:
        out = book_generate(model, idx, n_new, config.context_length)
        return (out.shape[1] - len(PROMPT)) * batch

    return run


def hf_runner(config: GPTConfig, batch: int, n_new: int) -> Callable[[], int] | None:
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_cfg = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.emb_dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hf_cfg).eval()
    ids = torch.tensor([PROMPT] * batch)
    mask = torch.ones_like(ids)

    def run() -> int:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=0,
            )
        return (out.shape[1] - len(PROMPT)) * batch

    return run


def timed(run: Callable[[], int]) -> tuple[float, int]:
    t = time.perf_counter()
    n = run()
    return time.perf_counter() - t, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gpt2", help="jaxgpt preset (default: gpt2, 124M)")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of jaxgpt and HF")
    p.add_argument(
        "--book-repeats", type=int, default=1, help="timed repeats of the book's (0: skip it)"
    )
    p.add_argument("--quick", action="store_true", help="smoke mode: 8 tokens, 1 repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.book_repeats = 8, 1, 1
    config = get_preset(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    info = machine()
    info["loadavg_start"] = os.getloadavg()
    bw = bandwidth_gb_s(1 << (25 if args.quick else 29))
    n_params = count_params(init_params(config, jax.random.key(0)))
    floor_tok_s = bw["read"] * 1e9 / (4 * n_params)  # batch 1: every fp32 weight once a token
    print(f"machine: {info['cpu']}, {info['cores']} cores; versions {info['versions']}")
    print(f"memory read bandwidth {bw['read']:.1f} GB/s ({bw}); {n_params / 1e6:.1f}M params")
    print(f"batch-1 bandwidth floor: {floor_tok_s:.1f} tokens/s")

    results: list[dict[str, Any]] = []
    for batch in batches:
        impls = {
            "jaxgpt": jaxgpt_runner(config, batch, args.new_tokens),
            # The book's takes minutes at batch 8; --book-repeats 0 skips it.
            "book": book_runner(config, batch, args.new_tokens) if args.book_repeats else None,
            "transformers": hf_runner(config, batch, args.new_tokens),
        }
        impls = {k: v for k, v in impls.items() if v is not None}
        warmups = {"book": book_runner, "transformers": hf_runner}
        # jaxgpt's first call compiles its program; torch needs only a short warm-up.
        first = {"jaxgpt": timed(impls["jaxgpt"])[0]}
        for name, make in warmups.items():
            if name in impls:
                timed(make(config, batch, 2))
        times: dict[str, list[float]] = {name: [] for name in impls}
        tokens = {}
        for r in range(max(args.repeats, args.book_repeats)):
            for name, run in impls.items():  # alternate implementations within each repeat
                limit = args.book_repeats if name == "book" else args.repeats
                if r < limit:
                    dt, tokens[name] = timed(run)
                    times[name].append(dt)
        row = {"batch": batch, "new_tokens": args.new_tokens, "model": args.model}
        for name in impls:
            med = statistics.median(times[name])
            row[name] = {
                "tokens_per_s": tokens[name] / med,
                "seconds": times[name],
            }
        row["jaxgpt"]["first_call_s"] = first["jaxgpt"]
        # Compile estimate: first call minus a steady call (noisy on a shared machine).
        row["jaxgpt_compile_s"] = max(0.0, first["jaxgpt"] - statistics.median(times["jaxgpt"]))
        for ref in ("book", "transformers"):
            if ref in row:
                row[f"jaxgpt_over_{ref}"] = row["jaxgpt"]["tokens_per_s"] / row[ref]["tokens_per_s"]
        if batch == 1:
            row["jaxgpt_fraction_of_bandwidth_floor"] = row["jaxgpt"]["tokens_per_s"] / floor_tok_s
        results.append(row)
        print(json.dumps({"bench": "sampling", "device": info["cpu"], **row}))

    print()
    print("| batch | jaxgpt tok/s | book tok/s | transformers tok/s | vs book | vs transformers |")
    print("|---|---|---|---|---|---|")
    for row in results:
        cells = [
            f"{row[n]['tokens_per_s']:.1f}" if n in row else "-"
            for n in ("jaxgpt", "book", "transformers")
        ]
        ratios = [
            f"{row[k]:.1f}x" if k in row else "-"
            for k in ("jaxgpt_over_book", "jaxgpt_over_transformers")
        ]
        print(f"| {row['batch']} | " + " | ".join(cells + ratios) + " |")
    for row in results:
        if "jaxgpt_fraction_of_bandwidth_floor" in row:
            print(
                f"batch 1: jaxgpt at {row['jaxgpt_fraction_of_bandwidth_floor']:.0%} of the "
                f"bandwidth floor ({floor_tok_s:.1f} tokens/s at {bw['read']:.1f} GB/s)"
            )
        print(
            f"batch {row['batch']}: jaxgpt first call {row['jaxgpt']['first_call_s']:.1f} s "
            f"(compile ~{row['jaxgpt_compile_s']:.1f} s)"
        )
    info["loadavg_end"] = os.getloadavg()
    print(f"load average at start {info['loadavg_start']}, at end {info['loadavg_end']}")
    report = {
        "machine": info,
        "bandwidth_gb_s": bw,
        "params": n_params,
        "bandwidth_floor_tokens_per_s": floor_tok_s,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
