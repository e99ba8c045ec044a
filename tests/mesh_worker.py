"""Runs one scale-out scenario in a fresh process with its own device count; prints JSON.

The test process has 2 CPU devices fixed by conftest.py; meshes of 8 simulated devices and
multi-process runs need their own process. Usage (one JSON argument):
  python tests/mesh_worker.py '{"devices": 8, "task": "steps", ...}'
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _setup(args: dict[str, Any]) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args["devices"])
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if "coordinator" in args:
        from jaxgpt import parallel

        parallel.initialize_distributed(
            args["coordinator"], args["num_processes"], args["process_id"]
        )


def _steps(args: dict[str, Any]) -> dict[str, Any]:
    """Losses of `steps` train steps, unsharded and on each mesh, and the param shardings."""
    import jax
    import numpy as np

    from jaxgpt import data, tokenizer
    from jaxgpt.config import TrainConfig, get_preset
    from jaxgpt.optim import make_optimizer
    from jaxgpt.step import mesh_train_step

    config = get_preset("tiny").replace(drop_rate=0.1)  # dropout: the PRNG stream matters
    tc = TrainConfig(batch_size=8, lr=2e-3)
    tokens = tokenizer.encode_array(open(args["corpus"], encoding="utf-8").read())
    batches = list(data.batches(tokens, 8, 16, 16, seed=1, drop_last=True))[: args["steps"]]
    tx = make_optimizer(tc, 100)
    out: dict[str, Any] = {}
    for spec in [None, *args["meshes"]]:  # None: today's one-device path
        state, step, put = mesh_train_step(config, tx, jax.random.key(0), spec)
        losses = []
        for batch in batches:
            state, m = step(state, put(batch))
            losses.append(float(m["loss"]))
        out[str(spec)] = {
            "losses": losses,
            # spec and per-device shard shape of a few leaves, after training (kept sharded)
            "leaves": {
                name: {
                    "spec": str(leaf.sharding.spec) if spec else None,
                    "devices": len(leaf.sharding.device_set),
                    "shard_shape": list(leaf.addressable_shards[0].data.shape),
                    "shape": list(leaf.shape),
                }
                for name, leaf in [
                    ("tok_emb", state.params["tok_emb"]["embedding"]),
                    ("norm_scale", state.params["final_norm"]["scale"]),
                    ("adam_mu_tok_emb", _find(state.opt_state, ".mu", "tok_emb")),
                ]
            },
            "batch_spec": str(put(batches[0])[0].sharding.spec) if spec else None,
            "finite": bool(np.isfinite(losses).all()),
        }
    return out


def _switches(args: dict[str, Any]) -> list[dict[str, list[float]]]:
    """Per variant ({"model": GPTConfig fields over the tiny preset, "grad_accum": K}): losses of
    `steps` train steps on one device (key "None") and on each mesh. Each variant's state is
    initialised once, on one device, and placed on each mesh (a sharded init equals it:
    test_8_devices_follow_the_one_device_losses_and_are_sharded)."""
    import jax
    import jax.numpy as jnp

    from jaxgpt import data, parallel, tokenizer
    from jaxgpt.config import TrainConfig, get_preset
    from jaxgpt.optim import make_optimizer
    from jaxgpt.step import init_train_state, make_train_step

    text = open(args["corpus"], encoding="utf-8").read()
    out = []
    for variant in args["variants"]:
        config = get_preset("tiny").replace(drop_rate=0.1, **variant["model"])
        tc = TrainConfig(batch_size=16, lr=2e-3, grad_accum=variant["grad_accum"])
        tokens = tokenizer.encode_array(text) % config.vocab_size  # a small vocabulary: folded
        batches = list(data.batches(tokens, 16, 16, 16, seed=1, drop_last=True))[: args["steps"]]
        tx = make_optimizer(tc, 100)
        start = init_train_state(config, tx, jax.random.key(0))
        copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        losses: dict[str, list[float]] = {}
        for spec in [*args["meshes"], None]:  # one device last: its step donates `start`
            step, put, state = make_train_step(config, tx, tc.grad_accum), (lambda b: b), start
            if spec is not None:
                mesh = parallel.make_mesh(spec)
                shardings = (parallel.tree_shardings(start, mesh), parallel.batch_sharding(mesh))
                step = make_train_step(config, tx, tc.grad_accum, shardings=shardings)
                put = lambda b, mesh=mesh: parallel.put_batch(b, mesh)  # noqa: E731
                # Copied first: device_put may reuse a buffer of `start`, which the step donates.
                state = jax.device_put(copy(start), shardings[0])
            losses[str(spec)] = []
            for batch in batches:
                state, m = step(state, put(batch))
                losses[str(spec)].append(float(m["loss"]))
        out.append(losses)
    return out


def _fsdp_memory(args: dict[str, Any]) -> dict[str, Any]:
    """The FSDP train step of `model` (GPTConfig fields) on `mesh`, compiled for a batch of
    `batch` rows: XLA's memory analysis of one device, the parameter counts, and the result
    shapes of every all-gather in the compiled program."""
    import re

    import jax
    import jax.numpy as jnp

    from jaxgpt import parallel
    from jaxgpt.config import GPTConfig, TrainConfig
    from jaxgpt.model import count_params
    from jaxgpt.optim import make_optimizer
    from jaxgpt.step import init_train_state, make_train_step

    config = GPTConfig(**args["model"])
    tx = make_optimizer(TrainConfig(), 100)
    state = jax.eval_shape(lambda: init_train_state(config, tx, jax.random.key(0)))
    mesh = parallel.make_mesh(args["mesh"])
    batch_sh = parallel.batch_sharding(mesh)
    step = make_train_step(config, tx, shardings=(parallel.tree_shardings(state, mesh), batch_sh))
    ids = jax.ShapeDtypeStruct((args["batch"], config.context_length), jnp.int32, sharding=batch_sh)
    compiled = step.lower(state, (ids, ids)).compile()
    mem = compiled.memory_analysis()
    gathers = []
    for line in compiled.as_text().splitlines():
        if re.search(r" all-gather(-start)?\(", line):
            result = line.split("=", 1)[1].split("all-gather", 1)[0]  # "f32[128,512]{1,0}"
            shapes = re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", result)
            gathers += [[t, [int(d) for d in dims.split(",") if d]] for t, dims in shapes]
    blocks = state.params["trf_blocks"]
    return {
        "params": count_params(state.params),
        "block_params": count_params(blocks) // config.n_layers,
        "stacked_shapes": [list(x.shape) for x in jax.tree.leaves(blocks)],
        "arguments": mem.argument_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "all_gathers": gathers,
    }


def _find(tree: Any, *parts: str) -> Any:
    """The first leaf whose key path mentions all `parts`."""
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if all(p in jax.tree_util.keystr(path) for p in parts):
            return leaf
    raise KeyError(parts)


def _fit(args: dict[str, Any]) -> list[dict[str, Any]]:
    """`fit` runs one after another (TrainConfig fields, resume); each call's metrics rows."""
    from jaxgpt.config import TrainConfig, get_preset
    from jaxgpt.train import fit

    out = []
    for run in args["runs"]:
        config = get_preset("tiny").replace(**run.get("model", {}))
        tc = TrainConfig(**run["tc"])
        result = fit(config, tc, resume=run.get("resume", False), progress=False)
        leaf = result.state.params["tok_emb"]["embedding"]
        out.append({"rows": result.rows, "spec": str(getattr(leaf.sharding, "spec", None))})
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    _setup(args)
    tasks = {"steps": _steps, "fit": _fit, "switches": _switches, "fsdp_memory": _fsdp_memory}
    result = tasks[args["task"]](args)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
