"""The planner (`train.py --plan`): compile the training step for a model, its switches, a batch
and a mesh on the devices present, without data or a run folder, and say what each device holds.

Memory is XLA's own plan for one device's program (`compiled.memory_analysis()`); FLOPs are
XLA's cost analysis of the step next to the 6N + 12 L d T estimate. With
`XLA_FLAGS=--xla_force_host_platform_device_count=N` a laptop plans an N-device run.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt import freeze, parallel
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.model import count_params
from jaxgpt.optim import make_optimizer
from jaxgpt.run import run_mesh
from jaxgpt.step import init_train_state, make_train_step

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {f"{u}b": v for u, v in _UNITS.items() if u not in ("", "b")}
_UNITS |= {f"{u}ib": 1024 ** "_kmgt".index(u) for u in "kmgt"}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*")


def parse_size(text: str) -> int:
    """'80GiB' -> 85899345920 bytes. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
    (powers of 1024), K/M/G/T (as KB...); a plain number is bytes.

    Raises:
      ValueError: not a positive size.
    """
    m = _SIZE.fullmatch(text.lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 80GiB, 16GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def matmul_params(cfg: GPTConfig) -> int:
    """N: weights in matmuls, 12 e^2 per block plus the e x vocab head (padded vocab counted)."""
    return 12 * cfg.n_layers * cfg.emb_dim**2 + cfg.emb_dim * cfg.padded_vocab


def flops_per_token(cfg: GPTConfig, seq: int) -> dict[str, float]:
    """Model FLOPs per trained token, forward + backward, in both conventions.

    N = parameters that take part in matmuls (12 e^2 per block, plus the e x vocab head).
    nanoGPT/PaLM: 6 N + 12 L e T (attention scores and context, full square).
    llm.c/MaxText: 6 N + 6 L e T (causal: only the lower triangle is useful work).
    """
    n = matmul_params(cfg)
    attn = cfg.n_layers * cfg.emb_dim * seq
    return {"nanogpt": 6.0 * n + 12.0 * attn, "causal": 6.0 * n + 6.0 * attn}


def _total_steps(tc: TrainConfig) -> int:
    # The schedule's length changes learning-rate values, never shapes or memory.
    return max(tc.max_steps or 1000, tc.warmup_steps + 1)


def _per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (None: whole)."""
    leaves = jax.tree.leaves(tree)
    shards = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    return sum(
        math.prod(x.shape if s is None else s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, shards, strict=True)
    )


def xla_flops(config: GPTConfig, tc: TrainConfig) -> float:
    """XLA's count of one step's FLOPs (the whole batch, every device together).

    XLA's cost analysis counts a loop body once, so it runs on the step's HLO for 1- and
    2-layer copies of the model, unrolled and without accumulation, and extends the
    difference (one block, forward, backward and any recomputation) to n_layers.
    """
    tx = make_optimizer(tc, _total_steps(tc))
    batch = jax.ShapeDtypeStruct((tc.batch_size, config.context_length), jnp.int32)

    def count(layers: int) -> float:
        cfg = config.replace(n_layers=layers, scan_layers=False)
        state = jax.eval_shape(lambda: init_train_state(cfg, tx, jax.random.key(0)))
        cost = make_train_step(cfg, tx).lower(state, (batch, batch)).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    one, two = count(1), count(2)
    return one + (config.n_layers - 1) * (two - one)


def plan(config: GPTConfig, tc: TrainConfig, memory: int | None = None) -> dict[str, Any]:
    """Compile the train step `fit` would run for `config` and `tc` on the devices present.

    Reads no data and writes nothing. `memory`: a device's memory in bytes, for `fits`.

    Returns:
      A JSON-ready dict: devices, mesh, tokens_per_step, flops_per_step {"xla", "6N+12LdT"},
      per_device_bytes {params, opt_state, gradients, arguments, temporaries, outputs,
      aliased, peak} (peak = arguments + temporaries + outputs not aliased to an argument,
      XLA's memory analysis of one device's program), fits (None without `memory`).
    """
    mesh = run_mesh(tc)
    tx = make_optimizer(tc, _total_steps(tc))
    key = jax.random.key(tc.seed, impl=tc.prng_impl)
    trainable = freeze.select(tc.trainable, config)
    state = jax.eval_shape(lambda: init_train_state(config, tx, key, trainable=trainable))
    batch = jax.ShapeDtypeStruct((tc.batch_size, config.context_length), jnp.int32)
    shardings = None
    if mesh is None:
        step = make_train_step(config, tx, tc.grad_accum, trainable=trainable)
    else:
        shardings = parallel.tree_shardings(state, mesh)
        batch_sh = parallel.batch_sharding(mesh)
        shard_both = (shardings, batch_sh)
        step = make_train_step(config, tx, tc.grad_accum, shardings=shard_both, trainable=trainable)
        batch = jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=batch_sh)
    t = time.perf_counter()
    mem = step.lower(state, (batch, batch)).compile().memory_analysis()
    compile_s = time.perf_counter() - t
    params = _per_device_bytes(state.params, None if shardings is None else shardings.params)
    opt = _per_device_bytes(state.opt_state, None if shardings is None else shardings.opt_state)
    peak = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    tokens = tc.batch_size * config.context_length
    devices = 1 if mesh is None else mesh.size
    return {
        "devices": devices,
        "device_kind": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "mesh": None if mesh is None else dict(mesh.shape),
        "config": config.to_dict(),
        "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum,
        "tokens_per_step": tokens,
        "parameters": count_params(state.params),
        "flops_per_step": {
            "xla": xla_flops(config, tc),
            "6N+12LdT": flops_per_token(config, config.context_length)["nanogpt"] * tokens,
        },
        "per_device_bytes": {
            "params": params,
            "opt_state": opt,
            "gradients": params,  # the params' shapes, dtypes and shardings
            "arguments": mem.argument_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "peak": peak,
        },
        "memory": memory,
        "fits": None if memory is None else peak <= memory,
        "compile_s": round(compile_s, 2),
    }


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def format_plan(p: dict[str, Any]) -> list[str]:
    """The plan as the lines `train.py --plan` prints."""
    mesh = (
        "one device, no mesh"
        if p["mesh"] is None
        else "mesh " + ",".join(f"{k}={v}" for k, v in p["mesh"].items())
    )
    cfg = p["config"]
    b = p["per_device_bytes"]
    flops = p["flops_per_step"]
    lines = [
        f"Plan: {p['devices']} x {p['device_kind']} ({p['platform']}), {mesh}; compiled in "
        f"{p['compile_s']:.1f} s",
        f"Model: {p['parameters']:,} parameters; {cfg['n_layers']} layers, emb {cfg['emb_dim']}"
        f", dtype {cfg['dtype']}, scan_layers {cfg['scan_layers']}, remat {cfg['remat']}",
        f"Tokens per step: {p['tokens_per_step']:,} (batch {p['batch_size']} x "
        f"{cfg['context_length']}, grad-accum {p['grad_accum']})",
        f"FLOPs per step: {flops['xla']:.3e} (XLA cost analysis), {flops['6N+12LdT']:.3e} "
        "(6N + 12 L d T)",
        "Per device:",
    ]
    rows = [
        ("parameters", "params"),
        ("optimizer state", "opt_state"),
        ("gradients", "gradients"),
        ("XLA arguments", "arguments"),
        ("XLA temporaries", "temporaries"),
        ("XLA peak", "peak"),
    ]
    lines += [f"  {name:<17}{human_bytes(b[k]):>12}" for name, k in rows]
    lines[-1] += "  (arguments + temporaries + outputs not aliased to an argument)"
    if p["fits"] is not None:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"Peak {human_bytes(b['peak'])} {verdict} in {human_bytes(p['memory'])}")
    return lines
