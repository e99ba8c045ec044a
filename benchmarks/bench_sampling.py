"""Sampling speed: jaxgpt's cached `generate` vs the book's `generate` vs `transformers`.

Tokens per second for greedy decoding of `--new-tokens` tokens from a short prompt, at batch 1
and batch 8, on random weights of the `gpt2` (124M) config, all three in the same run with
alternating repeats. Also measures memory bandwidth, so batch-1 decoding can be reported as a
fraction of the bandwidth floor (every fp32 weight read once per token), and the first call's
time (compile included). Every result names the CPU, its vector extensions and cores.

  python benchmarks/bench_sampling.py            # full run, a few minutes on 2 cores
  python benchmarks/bench_sampling.py --quick    # smoke test
  python benchmarks/bench_sampling.py --profile  # + a jax.profiler trace, top XLA ops by time
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import profiling  # benchmarks/profiling.py
from machine import machine  # benchmarks/machine.py (run as a script: its folder is on sys.path)

from jaxgpt import sampling
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


# Control-flow ops span the ops they run; the runtime's argument parsing is no XLA op.
_NOT_OPS = re.compile(r"(while|conditional|call)(\.\d+)?$|ParseArguments$")


def _op_category(op_name: str, what: str, vocab: int) -> str:
    """Which part of a decode step an XLA op is, from its op_name or "opcode shape name"."""
    if "scatter" in op_name or "dynamic_update_slice" in op_name:
        return "kv-cache update"
    if "/trf_blocks_" in op_name:
        if re.search(r"/(W_query|W_key|W_value|out_proj|layers_0|layers_2)/dot_general", op_name):
            return "weight matmuls"
        return "attention" if "/att/" in op_name else "norms, gelu, residuals"
    if "dot_general" in op_name and ("GPT._head" in op_name or "GPT._forward" in op_name):
        return "vocab head"
    if "argmax" in op_name or "iota_reduce" in what:  # argmax: a reduce over (value, index)
        return "next-token pick"
    if what.startswith("dot "):  # XLA's own matrix-vector dots carry no metadata
        return "vocab head" if f",{vocab}]" in what else "weight matmuls"
    return "other"


def _hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (op_name metadata, "opcode shape name")} of a compiled HLO module."""
    ops = {}
    for m in re.finditer(r"%([\w.\-]+) = \w+(\[[\d,]*\])\S* (\w[\w\-]*)\(([^\n]*)", hlo_text):
        name, shape, opcode, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = (meta.group(1) if meta else "", f"{opcode} {shape} {name}")
    return ops


def profile_generate(
    config: GPTConfig, batch: int, n_new: int, out_dir: str, top: int = 15
) -> dict[str, Any]:
    """Trace one greedy `generate` call; rank XLA ops by time per new token, by op and by part.

    Op times are summed over threads (independent ops overlap), so shares are of work, not wall.
    """
    params = init_params(config, jax.random.key(0))
    args, plan = sampling._pack(config, [PROMPT] * batch, n_new, 0.0, None, None, None, 1, 1.0)
    key = jax.random.key(0)
    compiled = sampling._generate_padded.lower(params, *args, key, plan=plan).compile()
    ops = _hlo_ops(compiled.as_text())
    jax.block_until_ready(compiled(params, *args, key))
    trace_dir, rows = profiling.top_ops(
        lambda: jax.block_until_ready(compiled(params, *args, key)), 1, out_dir, top=1 << 30
    )
    total = {r["op"]: r["ms_per_call"] for r in rows if not _NOT_OPS.match(r["op"])}
    work = sum(total.values()) or 1.0
    parts: collections.Counter[str] = collections.Counter()
    for name, ms in total.items():
        parts[_op_category(*ops.get(name, ("", name)), config.vocab_size)] += ms
    top_ops = [
        {
            "op": name,
            "ms_per_token": ms / n_new,
            "share": ms / work,
            "part": _op_category(*ops.get(name, ("", name)), config.vocab_size),
            "op_name": ops.get(name, ("", ""))[0][-80:] or ops.get(name, ("", ""))[1],
        }
        for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]
    ]
    by_part = {k: {"ms_per_token": v / n_new, "share": v / work} for k, v in parts.items()}
    return {"batch": batch, "trace": trace_dir, "by_part": by_part, "top_ops": top_ops}


def print_profile(prof: dict[str, Any]) -> None:
    print(f"\nprofile, batch {prof['batch']} (trace: {prof['trace']})")
    for part, v in sorted(prof["by_part"].items(), key=lambda kv: -kv[1]["share"]):
        print(f"  {part:24s} {v['ms_per_token']:8.2f} ms/token {v['share']:6.1%}")
    for op in prof["top_ops"]:
        print(
            f"  {op['ms_per_token']:8.3f} ms/token {op['share']:6.1%}  {op['op']:28s} "
            f"[{op['part']}] {op['op_name']}"
        )


def timed(run: Callable[[], int]) -> tuple[float, int]:
    t = time.perf_counter()
    n = run()
    return time.perf_counter() - t, n


def measure(impls: dict[str, Callable[[], int]], repeats: int, book_repeats: int) -> dict:
    """Alternate the implementations within each repeat; {name: ([seconds], tokens)}."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    tokens: dict[str, int] = {}
    for r in range(max(repeats, book_repeats)):
        for name, run in impls.items():
            if r < (book_repeats if name == "book" else repeats):
                dt, tokens[name] = timed(run)
                times[name].append(dt)
    return {name: (times[name], tokens[name]) for name in impls}


def result_row(config_name: str, batch: int, n_new: int, measured: dict, first_s: float) -> dict:
    """Tokens/s per implementation (median repeat), same-run ratios and the first call's time."""
    row: dict[str, Any] = {"batch": batch, "new_tokens": n_new, "model": config_name}
    for name, (secs, n) in measured.items():
        row[name] = {"tokens_per_s": n / statistics.median(secs), "seconds": secs}
    jax_secs = measured["jaxgpt"][0]
    row["jaxgpt"]["first_call_s"] = first_s  # compile + one run
    row["jaxgpt_compile_s"] = max(0.0, first_s - statistics.median(jax_secs))
    for ref in ("book", "transformers"):
        if ref in row:
            row[f"jaxgpt_over_{ref}"] = row["jaxgpt"]["tokens_per_s"] / row[ref]["tokens_per_s"]
    if "transformers" in measured:
        # Repeat r of each ran back to back: the ratio per pair sees the same machine load.
        pairs = [h / j for j, h in zip(jax_secs, measured["transformers"][0], strict=False)]
        row["jaxgpt_over_transformers_paired"] = {"median": statistics.median(pairs), "all": pairs}
    return row


def print_table(results: list[dict], floor_tok_s: float, read_gb_s: float) -> None:
    print()
    print("| batch | jaxgpt tok/s | book tok/s | transformers tok/s | vs book | vs transformers |")
    print("|---|---|---|---|---|---|")
    for row in results:
        cells = [
            f"{row[n]['tokens_per_s']:.1f}" if n in row else "-"
            for n in ("jaxgpt", "book", "transformers")
        ]
        ratios = [
            f"{row[k]:.2f}x" if k in row else "-"
            for k in ("jaxgpt_over_book", "jaxgpt_over_transformers")
        ]
        print(f"| {row['batch']} | " + " | ".join(cells + ratios) + " |")
    for row in results:
        if "jaxgpt_fraction_of_bandwidth_floor" in row:
            print(
                f"batch 1: jaxgpt at {row['jaxgpt_fraction_of_bandwidth_floor']:.0%} of the "
                f"bandwidth floor ({floor_tok_s:.1f} tokens/s at {read_gb_s:.1f} GB/s)"
            )
        if "jaxgpt_over_transformers_paired" in row:
            paired = row["jaxgpt_over_transformers_paired"]["all"]
            print(
                f"batch {row['batch']}: paired ratios vs transformers "
                + ", ".join(f"{r:.2f}x" for r in paired)
            )
        print(
            f"batch {row['batch']}: jaxgpt first call {row['jaxgpt']['first_call_s']:.1f} s "
            f"(compile ~{row['jaxgpt_compile_s']:.1f} s)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gpt2", help="jaxgpt preset (default: gpt2, 124M)")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of jaxgpt and HF (0: profile only)"
    )
    p.add_argument(
        "--book-repeats", type=int, default=1, help="timed repeats of the book's (0: skip it)"
    )
    p.add_argument("--quick", action="store_true", help="smoke mode: 8 tokens, 1 repeat")
    p.add_argument("--profile", action="store_true", help="trace jaxgpt, print the top ops")
    p.add_argument("--profile-dir", default=None, help="where the trace goes (default: a tmp dir)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.book_repeats = 8, 1, 1
    config = get_preset(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    info = machine()
    where = {k: info[k] for k in ("cpu", "vector_extensions", "cores")}
    info["loadavg_start"] = os.getloadavg()
    bw = bandwidth_gb_s(1 << (25 if args.quick else 29))
    n_params = count_params(init_params(config, jax.random.key(0)))
    floor_tok_s = bw["read"] * 1e9 / (4 * n_params)  # batch 1: every fp32 weight once a token
    ext = ", ".join(info["vector_extensions"]) or "none found"
    print(f"machine: {info['cpu']} ({ext}), {info['cores']} cores; versions {info['versions']}")
    print(f"memory read bandwidth {bw['read']:.1f} GB/s ({bw}); {n_params / 1e6:.1f}M params")
    print(f"batch-1 bandwidth floor: {floor_tok_s:.1f} tokens/s; load average {os.getloadavg()}")

    results: list[dict[str, Any]] = []
    for batch in batches if args.repeats > 0 else []:  # --repeats 0: profile only
        impls = {
            "jaxgpt": jaxgpt_runner(config, batch, args.new_tokens),
            # The book's takes minutes at batch 8; --book-repeats 0 skips it.
            "book": book_runner(config, batch, args.new_tokens) if args.book_repeats else None,
            "transformers": hf_runner(config, batch, args.new_tokens),
        }
        impls = {k: v for k, v in impls.items() if v is not None}
        # jaxgpt's first call compiles its program; torch needs only a short warm-up.
        first_s = timed(impls["jaxgpt"])[0]
        for name, make in {"book": book_runner, "transformers": hf_runner}.items():
            if name in impls:
                timed(make(config, batch, 2))
        measured = measure(impls, args.repeats, args.book_repeats)
        row = result_row(args.model, batch, args.new_tokens, measured, first_s)
        if batch == 1:
            row["jaxgpt_fraction_of_bandwidth_floor"] = row["jaxgpt"]["tokens_per_s"] / floor_tok_s
        row["loadavg"] = os.getloadavg()
        results.append(row)
        print(json.dumps({"bench": "sampling", "device": info["cpu"], **where, **row}))

    print_table(results, floor_tok_s, bw["read"])
    profiles = []
    if args.profile:
        out_dir = args.profile_dir or tempfile.mkdtemp(prefix="jaxgpt-sampling-profile-")
        for batch in batches:
            where_to = os.path.join(out_dir, f"batch-{batch}")
            profiles.append(profile_generate(config, batch, args.new_tokens, where_to))
            print_profile(profiles[-1])
    info["loadavg_end"] = os.getloadavg()
    print(f"load average at start {info['loadavg_start']}, at end {info['loadavg_end']}")
    report = {
        "machine": info,
        "bandwidth_gb_s": bw,
        "params": n_params,
        "bandwidth_floor_tokens_per_s": floor_tok_s,
        "results": results,
    }
    if profiles:
        report["profiles"] = profiles
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
