"""Shared by the format modules: flat param paths, key and shape checks, config reconciling."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.model import GPT, Params, to_canonical, to_layout, unstack_blocks
from jaxgpt.model import flatten_params as flatten
from jaxgpt.model import unflatten_params as unflatten

Flat = dict[str, np.ndarray]  # "trf_blocks_0/att/W_query/kernel" -> array
# A full GPTConfig (checked strictly), a preset name (gives n_heads for that width) or a dict
# of field overrides such as {"n_heads": 4}.
ConfigLike = GPTConfig | str | Mapping[str, Any] | None
# Fields a weights file fixes through its shapes (n_heads is not among them).
_SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_layers", "qkv_bias")


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{flat param path: shape} of `GPT(config)` in the file layout (unrolled layers, no
    vocabulary padding), from abstract evaluation (no compute)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    canonical = GPT(config.replace(scan_layers=False, vocab_pad=1))
    tree = jax.eval_shape(lambda k, x: canonical.init(k, x)["params"], jax.random.key(0), ids)
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def to_numpy(params: Params, config: GPTConfig | None = None) -> Flat:
    """Flat NumPy copy of a params pytree (float32 unless stored otherwise), layers unrolled;
    with `config`, a padded vocabulary is cut back to `config.vocab_size` (for export)."""
    tree = unstack_blocks(params) if config is None else to_canonical(params, config)
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_unused(leftover: Iterable[str], source: str) -> None:
    """Raise when a foreign file holds keys the mapping did not consume."""
    leftover = list(leftover)
    if leftover:
        raise ValueError(
            f"{source}: unexpected keys {_names(leftover)}; is this a GPT-2 model of that format?"
        )


def build_params(flat: Flat, config: GPTConfig, source: str) -> Params:
    """Validate a flat jaxgpt dict (unrolled layers) against `config` and return the nested
    params pytree in the config's layout."""
    want = expected_shapes(config)
    missing, extra = set(want) - set(flat), set(flat) - set(want)
    if missing or extra:
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"extra {_names(extra)}"] if extra else []
        raise ValueError(f"{source}: params do not match the config: {'; '.join(parts)}")
    bad = [f"{k} {flat[k].shape} != {want[k]}" for k in sorted(want) if flat[k].shape != want[k]]
    if bad:
        raise ValueError(
            f"{source}: shapes disagree with the config: {_names(bad, 4)}; the weights do not "
            "belong to that config: pass the matching config (or --model) or other weights"
        )
    dtype = jnp.dtype(config.param_dtype)
    return to_layout(unflatten({k: jnp.asarray(v, dtype) for k, v in flat.items()}), config)


def preset_heads(emb_dim: int) -> int:
    """n_heads of the OpenAI GPT-2 preset whose width is `emb_dim`."""
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        if PRESETS[name].emb_dim == emb_dim:
            return PRESETS[name].n_heads
    raise ValueError(
        f"cannot infer n_heads for emb_dim={emb_dim} (no GPT-2 size has that width); "
        "pass config={'n_heads': N} (or a GPTConfig / preset name), or --n-heads / --model"
    )


def gives_heads(config: ConfigLike) -> bool:
    """Whether a caller's config supplies n_heads (so shapes need not imply it)."""
    return config is not None and (not isinstance(config, Mapping) or "n_heads" in config)


def reconcile(inferred: GPTConfig, given: ConfigLike, source: str) -> GPTConfig:
    """Merge what the file's shapes say with what the caller gives.

    A GPTConfig is taken whole, and its shape fields must agree with the file. A preset name
    supplies only n_heads (its width must match). A dict overrides the fields it names.
    """
    if given is None:
        return inferred
    if isinstance(given, str):
        preset = get_preset(given)
        if preset.emb_dim != inferred.emb_dim:
            raise ValueError(
                f"{source} has emb_dim={inferred.emb_dim} but preset {given!r} has "
                f"emb_dim={preset.emb_dim}; pick the preset of that width or give n_heads"
            )
        return inferred.replace(n_heads=preset.n_heads)
    cfg = given if isinstance(given, GPTConfig) else inferred.replace(**dict(given))
    diff = [
        f"{f}: file {getattr(inferred, f)!r}, config {getattr(cfg, f)!r}"
        for f in _SHAPE_FIELDS
        if getattr(inferred, f) != getattr(cfg, f)
    ]
    if diff:
        raise ValueError(f"{source} does not match the given config ({'; '.join(diff)})")
    return cfg


def tie_head(flat: Flat, file_tied: bool, config: GPTConfig, source: str) -> Flat:
    """Make `out_head/kernel` presence agree with `config.tie_embeddings`."""
    if config.tie_embeddings and not file_tied:
        head = flat.pop("out_head/kernel")
        if not np.array_equal(head, flat["tok_emb/embedding"].T):
            raise ValueError(
                f"{source} has an output head different from the token embedding; "
                "load it with tie_embeddings=False"
            )
    elif not config.tie_embeddings and file_tied:
        flat["out_head/kernel"] = np.ascontiguousarray(flat["tok_emb/embedding"].T)
    return flat


def split_qkv(w: np.ndarray, b: np.ndarray | None, prefix: str) -> Flat:
    """Fused QKV (in, 3 emb) kernel and (3 emb,) bias -> W_query/W_key/W_value entries."""
    out: Flat = {}
    for name, wi in zip(("W_query", "W_key", "W_value"), np.split(w, 3, axis=-1), strict=True):
        out[f"{prefix}/att/{name}/kernel"] = wi
    if b is not None:
        for name, bi in zip(("W_query", "W_key", "W_value"), np.split(b, 3, axis=-1), strict=True):
            out[f"{prefix}/att/{name}/bias"] = bi
    return out


def fuse_qkv(flat: Flat, prefix: str, emb_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `split_qkv`; missing biases (qkv_bias=False) become zeros."""
    names = ("W_query", "W_key", "W_value")
    w = np.concatenate([flat[f"{prefix}/att/{n}/kernel"] for n in names], axis=-1)
    zeros = np.zeros(emb_dim, w.dtype)
    b = np.concatenate([flat.get(f"{prefix}/att/{n}/bias", zeros) for n in names], axis=-1)
    return w, b
