"""Checkpoints: Orbax save/restore of {train state, data position, configs}; params files; load.

A run folder holds `config.json` and `checkpoints/<step>/` (Orbax, atomic, last K kept).
Restores take the newest intact checkpoint: committed (Orbax's marker), readable, and equal
to the fingerprint saved with it. An exported params file is a `.npz` of "/"-joined param
paths plus the config as JSON.
On disk the layers are always unrolled (`trf_blocks_N`); scanned runs convert on save/load.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.model import (
    Params,
    flatten_params,
    is_stacked,
    stack_blocks,
    to_layout,
    unflatten_params,
    unstack_blocks,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints-damaged"  # where a resumed run moves checkpoints it could not read
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last into every finished step folder
_CONFIG_KEY = "__config__"
_FINGERPRINT = "fingerprint"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and rename, so readers never see half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_run_config(
    run_dir: str | os.PathLike, model: GPTConfig, train: TrainConfig, **extra: Any
) -> None:
    """`run_dir/config.json`: {"model": ..., "train": ..., **extra} (None values left out).

    Other entries of an existing file (a fine-tune's "init_from") are kept: a resumed run
    rewrites the settings, not the record of where its weights came from.
    """
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        kept = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    new = {k: v for k, v in extra.items() if v is not None}
    write_json_atomic(path, {**kept, **new, "model": model.to_dict(), "train": train.to_dict()})


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
        max_to_keep=keep,
        create=not read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,  # half-written saves of killed runs
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


@jax.jit
def _leaf_sum(x: jax.Array) -> jax.Array:
    """uint32[2]: the leaf's bits as uint32, summed plainly and weighted by odd position
    weights, wrapping mod 2**32 (so the order of additions does not change the result)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    u = bits.astype(jnp.uint32).ravel()  # (n,)
    w = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.stack([jnp.sum(u), jnp.sum(u * w) + jnp.uint32(u.size)])


@jax.jit
def _all_leaf_sums(leaves: list[jax.Array]) -> jax.Array:
    total = jnp.zeros(2, jnp.uint32)
    for x in leaves:
        total = total + _leaf_sum(x)
    return total


def _leaf_sums(leaves: list[jax.Array]) -> np.ndarray:
    # Leaves are added up, so their order and container types (dataclass, NamedTuple, or the
    # dicts Orbax returns without a target) do not matter. In one process: one small program
    # per leaf shape (a few for a GPT); the one program over all leaves took XLA 15 s to
    # compile for book-124m's 499 leaves, on every run's first save. Sharded states (a mesh,
    # several processes) keep that one program: their sums are collectives that every
    # process must run in step, and per-leaf programs over sharded leaves aborted XLA:CPU.
    arrays = [jnp.asarray(x) for x in leaves]
    if jax.process_count() > 1 or any(len(x.sharding.device_set) > 1 for x in arrays):
        return np.asarray(_all_leaf_sums(arrays))
    sums = jax.device_get([_leaf_sum(x) for x in arrays])  # [(2,) uint32]
    return np.sum(np.stack(sums), axis=0, dtype=np.uint32) if sums else np.zeros(2, np.uint32)


def fingerprint(tree: Any) -> str:
    """A 64-bit checksum of every array in `tree`, computed on device (8 bytes per leaf
    come back to the host)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    return "".join(f"{int(v):08x}" for v in _leaf_sums(leaves))


def precompile_fingerprint(state: Any, shardings: Any = None) -> None:
    """Compile, without running, the programs that fingerprint `state` (a TrainState, concrete
    or abstract) in a save and in a restore check. `shardings`: None (arrays on one device, not
    committed), one device's Sharding, or a tree of shardings matching `state` (a mesh)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        leaves = jax.tree.leaves(jax.eval_shape(_to_saveable, state))
        for shape, dtype in dict.fromkeys((x.shape, x.dtype) for x in leaves):
            _leaf_sum.lower(jax.ShapeDtypeStruct(shape, dtype, sharding=shardings)).compile()
    else:  # as restored: the layout on disk, each array on its own sharding
        _all_leaf_sums.lower(jax.tree.leaves(_disk_target(state, shardings))).compile()


def save(mngr: ocp.CheckpointManager, state: Any, meta: dict[str, Any]) -> None:
    """Save the TrainState and JSON metadata (data position, tokens seen, ...) at `state.step`.

    The state's fingerprint goes into the metadata, so a restore can tell damaged arrays.
    """
    step = int(state.step)
    if step in mngr.all_steps():
        return
    saveable = _to_saveable(state)
    meta = {**meta, _FINGERPRINT: fingerprint(saveable)}
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(saveable), meta=ocp.args.JsonSave(meta)
        ),
    )
    mngr.wait_until_finished()


def list_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the finished (committed) checkpoints in a run folder, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).is_file()
    )


def state_bytes(state: Any) -> int:
    """Bytes of all arrays in a (possibly abstract) state: about one checkpoint's size."""
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(jax.eval_shape(_to_saveable, state))
    )


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Newest checkpoint step in a run folder (finished or not), or None when there is none.

    Reads the folder names only (Orbax names a step's folder by its number once the save is
    renamed into place). No Orbax manager: building one is a collective in a multi-process
    run, so a call from one process alone would leave the others at another barrier.
    """
    root = Path(run_dir) / CHECKPOINTS
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(steps, default=None)


def _intact(
    mngr: ocp.CheckpointManager, step: int | None, read: Callable[[int], tuple[Any, dict]]
) -> tuple[int, Any, dict]:
    """(step, state, meta) of the newest intact checkpoint (or of `step`), warning about each
    damaged one passed over; ValueError naming the folder when none is intact."""
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise ValueError(f"no checkpoint in {mngr.directory}; start without --resume")
    for s in steps:
        why = damage(mngr, s, read)
        if isinstance(why, str):
            log.warning(
                "checkpoint %s is damaged (%s); trying an older one", mngr.directory / str(s), why
            )
            continue
        return s, *why
    raise ValueError(
        f"no intact checkpoint in {mngr.directory} (damaged: steps {steps}); "
        "start a new run with --out NEW_DIR"
    )


def damage(
    mngr: ocp.CheckpointManager, step: int, read: Callable[[int], tuple[Any, dict]]
) -> str | tuple[Any, dict]:
    """What is wrong with checkpoint `step` (a short reason), or its (state, meta) if intact."""
    if not (Path(mngr.directory) / str(step) / COMMIT_MARKER).is_file():
        return f"no {COMMIT_MARKER}: the save never finished"
    try:
        with _quiet_async_errors():
            state, meta = read(step)
    except ModelMismatchError:
        raise
    except Exception as e:  # tensorstore/JSON/Orbax errors: all mean "unreadable"
        first = str(e).split(" See full TensorStore")[0].splitlines()
        return f"unreadable: {type(e).__name__}: {first[0][:200] if first else ''}"
    want = meta.pop(_FINGERPRINT, None)
    if want is not None and fingerprint(state) != want:
        return "its arrays differ from the fingerprint saved with them"
    return state, meta


class ModelMismatchError(ValueError):
    """A checkpoint holds params of another model: bad input, not damage."""


def _param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}


def _check_same_model(step_dir: Path, target: Any) -> None:
    """Raise ModelMismatchError when the saved state differs from `target` in its params'
    paths or shapes, or in its arrays' shapes (another optimizer or jaxgpt version)."""
    try:
        md = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
        tree = dict(md.tree if hasattr(md, "tree") else md)
        saved = _param_shapes(tree["params"])
        saved_all = sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
    except Exception:  # unreadable metadata: the restore itself reports the damage
        return
    want = _param_shapes(target.params)
    diff = [
        f"{k}: saved {saved.get(k)}, model {want.get(k)}"
        for k in sorted(set(saved) | set(want))
        if saved.get(k) != want.get(k)
    ]
    if diff:
        raise ModelMismatchError(
            f"checkpoint {step_dir} holds another model ({'; '.join(diff[:2])}"
            f"{f' and {len(diff) - 2} more' if len(diff) > 2 else ''}); resume it with the "
            "model it was trained with (its config.json) or start a new run with --out"
        )
    want_all = sorted(tuple(x.shape) for x in jax.tree.leaves(target))
    if saved_all != want_all:
        raise ModelMismatchError(
            f"checkpoint {step_dir} holds a train state of another layout ({len(saved_all)} "
            f"arrays; this run's has {len(want_all)}): written with other optimizer settings "
            "or another jaxgpt version; resume it with those, or start a new run with --out"
        )


@contextlib.contextmanager
def _quiet_async_errors() -> Iterator[None]:
    """A failed Orbax read leaves sibling coroutines and thread callbacks that print
    tracebacks as they are dropped; the failure itself is reported once, by the caller."""
    hooks = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda u: log.debug("dropped: %s", u.exc_value)
    threading.excepthook = lambda a: log.debug("dropped: %s", a.exc_value)
    try:
        yield
    finally:
        gc.collect()  # drop the leftovers now, while the hooks are quiet
        sys.unraisablehook, threading.excepthook = hooks


def _disk_target(like: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `like`'s state in the layout on disk (layers unrolled, the key as
    raw uint32 data); with `shardings` (matching `like`) each says where it is read to.

    A scanned run's stacked leaf (layers, ...) is read layer by layer, each layer onto the
    stacked leaf's sharding less its leading layer axis.
    """
    if shardings is None:
        return jax.eval_shape(_to_saveable, like)
    abstract = jax.eval_shape(lambda s: s, like)
    placed = jax.tree.map(
        lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), abstract, shardings
    )
    raw = jax.eval_shape(jax.random.key_data, abstract.key)  # the key's sharding carries over
    return placed.replace(
        key=jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=placed.key.sharding),
        params=unstack_blocks(placed.params, take=_layer_of),
        opt_state=unstack_blocks(placed.opt_state, take=_layer_of),
    )


def _layer_of(leaf: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(*sharding.spec[1:])
        sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)


def restore(
    mngr: ocp.CheckpointManager, like: Any, step: int | None = None, *, shardings: Any = None
) -> tuple[Any, dict]:
    """Restore (TrainState, meta) of the newest intact checkpoint (or `step`) into `like`.

    Damaged checkpoints (uncommitted, unreadable, or not matching their fingerprint) are
    skipped with a warning naming them.

    Args:
      like: a TrainState (concrete or from `jax.eval_shape`) with the run's structure.
      shardings: a pytree of `jax.sharding.Sharding` matching `like`: each process reads
        just its shards onto this (maybe different) mesh. None: Orbax's default placement.

    Raises:
      ValueError: no intact checkpoint, naming the folder.
    """
    target = _disk_target(like, shardings)

    def read(s: int) -> tuple[Any, dict]:
        _check_same_model(Path(mngr.directory) / str(s), target)
        out = mngr.restore(
            s,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    _, state, meta = _intact(mngr, step, read)
    if "trf_blocks" in like.params:  # a scanned run: back to the stacked layout
        # (The optimizer state of a `--trainable` run mirrors an unrolled view: kept as read.)
        moments = stack_blocks if is_stacked(like.opt_state) else lambda t: t
        stack = lambda s: s.replace(  # noqa: E731
            params=stack_blocks(s.params), opt_state=moments(s.opt_state)
        )
        # On a mesh the stacked leaves land on the run's own shardings, each device
        # assembling its shards from the layers it read (one program, every process).
        state = (
            stack(state) if shardings is None else jax.jit(stack, out_shardings=shardings)(state)
        )
    # The key's PRNG (threefry2x32, rbg, ...): its dtype carries it, concrete or abstract.
    impl = like.key.dtype._impl.name
    return state.replace(key=jax.random.wrap_key_data(state.key, impl=impl)), meta


def set_aside_newer(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move checkpoints newer than `step` (damaged ones a resume passed over) into
    `run_dir/checkpoints-damaged/`, so new saves at those steps are not mistaken for them."""
    moved = []
    for p in sorted((Path(run_dir) / CHECKPOINTS).iterdir()):
        if p.name.isdigit() and int(p.name) > step:
            dst = Path(run_dir) / DAMAGED / f"{p.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            dst.parent.mkdir(exist_ok=True)
            shutil.move(str(p), dst)
            log.warning("moved damaged checkpoint %s to %s", p, dst)
            moved.append(dst)
    return moved


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[GPTConfig, Params]:
    """(GPTConfig, params) from a run folder's newest (or given) checkpoint."""
    config, _ = load_run_config(run_dir)
    if latest_step(run_dir) is None:
        raise ValueError(f"run folder {str(run_dir)!r} has no checkpoints yet")
    with manager(run_dir, read_only=True) as mngr:

        def read(s: int) -> tuple[Any, dict]:
            # No target: Orbax returns the saved tree as nested dicts.
            out = mngr.restore(
                s,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
            return out["state"], dict(out["meta"] or {})

        _, state, _ = _intact(mngr, step, read)
    return config, to_layout(jax.tree.map(jax.numpy.asarray, state["params"]), config)


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
