"""Which parameters train (`--trainable REGEX`): the trainable view of the params, which the
optimizer and the gradient see, and its merge back into the whole params.

The view names its leaves by their canonical paths (`trf_blocks_11/att/W_query/kernel`,
layers unrolled) in both layouts: a scanned run slices its layer out of the stacked leaf. So
the optimizer state, which mirrors the view, is the same tree whether the layers are scanned
or not, and a resumed run may switch `scan_layers` as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.model import Params, flatten_params, init_params, unflatten_params

_LAYER = re.compile(r"trf_blocks_(\d+)/(.+)")


def param_paths(config: GPTConfig) -> list[str]:
    """The "/"-joined paths of `GPT(config)`'s params, layers unrolled (no compute)."""
    canonical = config.replace(scan_layers=False, vocab_pad=1)
    tree = jax.eval_shape(lambda k: init_params(canonical, k), jax.random.key(0))
    return sorted(flatten_params(tree))


@dataclass(frozen=True)
class Trainable:
    """The canonical paths of the parameters that train; every other one is frozen."""

    paths: tuple[str, ...]

    def view(self, params: Params) -> Params:
        """The trainable leaves of `params` (either layout) as a nested dict by their paths."""
        flat = flatten_params(params)
        return unflatten_params({p: _take(flat, p) for p in self.paths})

    def merge(self, params: Params, view: Params) -> Params:
        """`params` with the trainable leaves replaced by `view`'s; frozen leaves are the very
        arrays of `params` (a scanned leaf keeps its frozen layers' values bit for bit)."""
        flat, new = flatten_params(params), flatten_params(view)
        layers: dict[str, list[tuple[int, Any]]] = {}
        for path, leaf in new.items():
            m = _LAYER.fullmatch(path)
            if path in flat or m is None:
                flat[path] = leaf
            else:  # scanned: layer i of the stacked leaf trf_blocks/<rest>
                layers.setdefault(f"trf_blocks/{m[2]}", []).append((int(m[1]), leaf))
        for path, parts in layers.items():
            idx = np.array([i for i, _ in parts])  # (trainable layers,)
            flat[path] = flat[path].at[idx].set(jnp.stack([x for _, x in parts]))
        return unflatten_params(flat)

    def count(self, params: Params) -> int:
        """Scalars that train."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.view(params)))


def _take(flat: dict[str, Any], path: str) -> Any:
    if path in flat:
        return flat[path]
    m = _LAYER.fullmatch(path)
    return flat[f"trf_blocks/{m[2]}"][int(m[1])]  # (layers, ...) -> layer m[1]


def select(pattern: str | None, config: GPTConfig) -> Trainable | None:
    """The parameters whose whole path matches `pattern` (`re.fullmatch`); None when there is
    no pattern or it matches every parameter (then the plain optimizer over all params runs).

    Raises:
      ValueError: the pattern is no regular expression, or it matches no parameter.
    """
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--trainable {pattern!r} is not a regular expression ({e})") from None
    paths = param_paths(config)
    chosen = tuple(p for p in paths if rx.fullmatch(p))
    if not chosen:
        last = config.n_layers - 1
        seen = ("tok_emb/embedding", "out_head/kernel", f"trf_blocks_{last}/att/W_query/kernel")
        raise ValueError(
            f"--trainable {pattern!r} matches no parameter path (the whole path must match; "
            f"paths look like {', '.join(p for p in seen if p in paths)}); e.g. --trainable "
            f"'(trf_blocks_{last}|final_norm|out_head)/.*' trains the last block, the final "
            "norm and the head (docs/finetuning.md lists the paths)"
        )
    return None if len(chosen) == len(paths) else Trainable(chosen)


def summary(
    trainable: Trainable | None, tx: optax.GradientTransformation, params: Params, opt_state: Any
) -> dict[str, int]:
    """Scalars that train, the optimizer state's bytes, and the bytes freezing saves (what
    `tx`'s state over every parameter would hold, less `opt_state`'s)."""
    if trainable is None:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        return {"trainable_params": n, "opt_state_bytes": _nbytes(opt_state), "opt_saved_bytes": 0}
    whole = jax.eval_shape(tx.init, params)
    return {
        "trainable_params": trainable.count(params),
        "opt_state_bytes": _nbytes(opt_state),
        "opt_saved_bytes": _nbytes(whole) - _nbytes(opt_state),
    }


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
