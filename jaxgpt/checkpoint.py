"""Checkpoints: Orbax save/restore of {train state, data position, configs}; params files; load.

A run folder holds `config.json` and `checkpoints/<step>/` (Orbax, atomic, last K kept).
An exported params file is a `.npz` of "/"-joined param paths plus the config as JSON.
On disk the layers are always unrolled (`trf_blocks_N`); scanned runs convert on save/load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.model import (
    Params,
    flatten_params,
    stack_blocks,
    to_layout,
    unflatten_params,
    unstack_blocks,
)

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
_CONFIG_KEY = "__config__"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and rename, so readers never see half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_run_config(run_dir: str | os.PathLike, model: GPTConfig, train: TrainConfig) -> None:
    """`run_dir/config.json`: {"model": ..., "train": ...}."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        Path(run_dir) / CONFIG_FILE, {"model": model.to_dict(), "train": train.to_dict()}
    )


def load_run_config(run_dir: str | os.PathLike) -> tuple[GPTConfig, TrainConfig]:
    """The model and training settings a run folder was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; is {str(run_dir)!r} a run folder?")
    d = json.loads(path.read_text(encoding="utf-8"))
    return GPTConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"])


def manager(
    run_dir: str | os.PathLike, *, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """An Orbax manager over `run_dir/checkpoints`, keeping the last `keep` steps.

    `read_only` only means "do not create the folder": readers never save.

    Saves are synchronous: the train step donates its state, so the buffers must be
    written before the next step reuses them.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, options=options)


def _to_saveable(state: Any) -> Any:
    # Typed PRNG keys cannot be serialised; store their raw uint32 data. Scanned (stacked)
    # params and optimizer moments are written unrolled, the one layout on disk.
    return state.replace(
        key=jax.random.key_data(state.key),
        params=unstack_blocks(state.params),
        opt_state=unstack_blocks(state.opt_state),
    )


def save(mngr: ocp.CheckpointManager, state: Any, meta: dict[str, Any]) -> None:
    """Save the TrainState and JSON metadata (data position, tokens seen, ...) at `state.step`."""
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
        ),
    )
    mngr.wait_until_finished()


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Newest checkpoint step in a run folder, or None when there is none."""
    if not (Path(run_dir) / CHECKPOINTS).is_dir():
        return None
    with manager(run_dir, read_only=True) as mngr:
        return mngr.latest_step()


def restore(
    mngr: ocp.CheckpointManager, like: Any, step: int | None = None, *, shardings: Any = None
) -> tuple[Any, dict]:
    """Restore (TrainState, meta) at `step` (default: newest) into the structure of `like`.

    Args:
      like: a TrainState (concrete or from `jax.eval_shape`) with the run's structure.
      shardings: a pytree of `jax.sharding.Sharding` matching `like`: each process reads
        just its shards onto this (maybe different) mesh. None: Orbax's default placement.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no checkpoint in {mngr.directory}; start without --resume")
    target = jax.eval_shape(_to_saveable, like)  # ShapeDtypeStructs; works on abstract `like`
    if shardings is not None:  # the key's sharding carries over to its raw uint32 data
        target = jax.tree.map(
            lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings
        )
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    state = out["state"]
    if "trf_blocks" in like.params:  # a scanned run: back to the stacked layout
        state = state.replace(
            params=stack_blocks(state.params), opt_state=stack_blocks(state.opt_state)
        )
    # The key's PRNG (threefry2x32, rbg, ...): its dtype carries it, concrete or abstract.
    impl = like.key.dtype._impl.name
    return state.replace(key=jax.random.wrap_key_data(state.key, impl=impl)), dict(out["meta"])


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[GPTConfig, Params]:
    """(GPTConfig, params) from a run folder's newest (or given) checkpoint."""
    config, _ = load_run_config(run_dir)
    if latest_step(run_dir) is None:
        raise ValueError(f"run folder {str(run_dir)!r} has no checkpoints yet")
    with manager(run_dir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        # No target: Orbax returns the saved tree as nested dicts; take the params.
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return config, to_layout(jax.tree.map(jax.numpy.asarray, out["state"]["params"]), config)


def save_params(path: str | os.PathLike, config: GPTConfig, params: Params) -> None:
    """Export params to one `.npz` ("/"-joined paths, plus the config as JSON); NumPy only."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"params file {str(path)!r} must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {k: np.asarray(v) for k, v in flatten_params(unstack_blocks(params)).items()}
    np.savez(tmp, **arrays, **{_CONFIG_KEY: np.array(json.dumps(config.to_dict()))})
    tmp.replace(path)


def load_params(path: str | os.PathLike) -> tuple[GPTConfig, Params]:
    """(GPTConfig, params) from a file written by `save_params`."""
    with np.load(path, allow_pickle=False) as f:
        if _CONFIG_KEY not in f:
            raise ValueError(f"{str(path)!r} is not a jaxgpt params file (no {_CONFIG_KEY})")
        config = GPTConfig.from_dict(json.loads(str(f[_CONFIG_KEY])))
        flat = {name: jax.numpy.asarray(f[name]) for name in f.files if name != _CONFIG_KEY}
    return config, to_layout(unflatten_params(flat), config)


def load(path: str | os.PathLike) -> tuple[GPTConfig, Params]:
    """(GPTConfig, params) from a jaxgpt run folder (newest checkpoint) or a `.npz` params file."""
    p = Path(path)
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        return load_run(p)
    if p.is_file() and p.suffix == ".npz":
        return load_params(p)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    raise ValueError(f"{str(p)!r} is neither a jaxgpt run folder nor a .npz params file")
