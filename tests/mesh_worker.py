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
    result = {"steps": _steps, "fit": _fit}[args["task"]](args)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
