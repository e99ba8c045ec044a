"""The book's PyTorch files (`GPTModel` state dicts and training checkpoints) <-> jaxgpt.

Book names match jaxgpt's nearly one to one (`trf_blocks.0.att.W_query.weight` is
`trf_blocks_0/att/W_query/kernel`); nn.Linear weights are (out, in), so kernels transpose.
A state dict carries no config: shapes give vocab, context, width, depth, QKV bias and tying;
n_heads comes from the caller or from the GPT-2 size of that width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interop.common import (
    ConfigLike,
    Flat,
    build_params,
    check_unused,
    expected_shapes,
    gives_heads,
    preset_heads,
    reconcile,
    tie_head,
    to_numpy,
)
from jaxgpt.interop.tensors import (
    check_writable,
    numpy_dict,
    read_safetensors,
    read_torch,
    write_safetensors,
    write_torch,
)
from jaxgpt.model import Params

BOOK_SUFFIXES = (".pth", ".pt", ".safetensors")
_META_KEY = "jaxgpt_config"  # safetensors metadata written by export_book


def book_key(path: str) -> tuple[str, bool]:
    """jaxgpt path -> (book state-dict key, whether the array is transposed)."""
    parts = path.split("/")
    parts = [p.replace("trf_blocks_", "trf_blocks.").replace("layers_", "layers.") for p in parts]
    last = parts[-1]
    parts[-1] = "weight" if last in ("kernel", "embedding") else last
    return ".".join(parts), last == "kernel"


def _mask_keys(sd: Mapping[str, Any]) -> list[str]:
    return [k for k in sd if k.startswith("trf_blocks.") and k.endswith(".att.mask")]


def infer_book_config(
    sd: Mapping[str, np.ndarray], source: str, has_optimizer: bool, n_heads: int | None = None
) -> GPTConfig:
    """What the shapes say; n_heads (default: the GPT-2 size of that width); book defaults."""
    if "tok_emb.weight" not in sd or "pos_emb.weight" not in sd:
        raise ValueError(
            f"{source}: no tok_emb.weight/pos_emb.weight; not a state dict of the book's GPTModel"
        )
    vocab, emb = sd["tok_emb.weight"].shape
    head = sd.get("out_head.weight")
    # A head equal to the embedding (the book's load_weights_into_gpt) is tied; with optimizer
    # state the two were trained separately, so they stay separate.
    tied = head is None or (not has_optimizer and np.array_equal(head, sd["tok_emb.weight"]))
    return GPTConfig(
        vocab_size=vocab,
        context_length=sd["pos_emb.weight"].shape[0],
        emb_dim=emb,
        n_heads=preset_heads(emb) if n_heads is None else n_heads,
        n_layers=len({k.split(".")[1] for k in sd if k.startswith("trf_blocks.")}),
        qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
        tie_embeddings=tied,
    )


def _to_flat(sd: dict[str, np.ndarray], cfg: GPTConfig, source: str) -> tuple[Flat, bool]:
    left = {k: v for k, v in sd.items() if k not in _mask_keys(sd)}
    flat: Flat = {}
    untied = cfg.replace(tie_embeddings=False)
    for path in expected_shapes(untied):
        key, transpose = book_key(path)
        if key not in left:
            if key == "out_head.weight":
                continue
            raise ValueError(f"{source}: missing key {key!r}")
        x = left.pop(key)
        flat[path] = np.ascontiguousarray(x.T) if transpose else x
    check_unused(left, source)
    tied = "out_head/kernel" not in flat
    return flat, tied


def from_book_state_dict(
    state_dict: Mapping[str, Any],
    config: ConfigLike = None,
    *,
    source: str = "book state dict",
    has_optimizer: bool = False,
) -> tuple[GPTConfig, Params]:
    """Convert `GPTModel.state_dict()` (torch tensors or arrays) to jaxgpt (config, params).

    Args:
      state_dict: the book's model state dict; `att.mask` buffers are ignored.
      config: a GPTConfig (its shape fields must match), a preset name (its n_heads) or a
        dict of overrides such as {"n_heads": 4}. Default: inferred, with the n_heads of the
        GPT-2 size of that width.
      has_optimizer: the file also holds optimizer state (keeps the head untied).
    """
    sd = numpy_dict(state_dict)
    # Placeholder n_heads=1 when the caller supplies it: no GPT-2 width needed then.
    n_heads = 1 if gives_heads(config) else None
    inferred = infer_book_config(sd, source, has_optimizer, n_heads=n_heads)
    cfg = reconcile(inferred, config, source)
    flat, tied = _to_flat(sd, cfg, source)
    flat = tie_head(flat, file_tied=tied, config=cfg, source=source)
    return cfg, build_params(flat, cfg, source)


def read_book_file(
    path: str | Path,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """(model state dict, optimizer state dict or None, safetensors metadata) of a book file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"book weights file {path} does not exist")
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        return dict(tensors), None, meta
    obj = read_torch(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if "model_state_dict" in obj:
        return dict(obj["model_state_dict"]), obj.get("optimizer_state_dict"), {}
    return dict(obj), None, {}


def load_book(path: str | Path, config: ConfigLike = None) -> tuple[GPTConfig, Params]:
    """Load `torch.save(model.state_dict())`, the book's checkpoint dict, or an exported
    `.safetensors` book file. Optimizer state, if any, is left for `load_book_optimizer`."""
    sd, opt, meta = read_book_file(path)
    if config is None and _META_KEY in meta:
        config = GPTConfig.from_dict(json.loads(meta[_META_KEY]))
    return from_book_state_dict(sd, config, source=str(path), has_optimizer=opt is not None)


def to_book_state_dict(config: GPTConfig, params: Params) -> dict[str, np.ndarray]:
    """jaxgpt params -> a state dict `GPTModel(cfg).load_state_dict(sd, strict=True)` accepts.

    Includes the causal-mask buffers (`att.mask`, ones above the diagonal); a tied head is
    written as a copy of the embedding since the book's model has a separate `out_head`.
    """
    flat = to_numpy(params, config)  # unrolled, vocabulary padding cut off
    if config.tie_embeddings:
        flat["out_head/kernel"] = flat["tok_emb/embedding"].T
    mask = np.triu(np.ones((config.context_length,) * 2, np.float32), k=1)  # (ctx, ctx)
    sd: dict[str, np.ndarray] = {}
    for path in expected_shapes(config.replace(tie_embeddings=False)):
        key, transpose = book_key(path)
        if key.endswith(".att.W_query.weight"):  # the buffer comes first in the book's order
            sd[key.removesuffix("W_query.weight") + "mask"] = mask
        sd[key] = np.ascontiguousarray(flat[path].T if transpose else flat[path])
    return sd


def export_book(
    config: GPTConfig, params: Params, path: str | Path, *, overwrite: bool = False
) -> Path:
    """Write a book state dict: `.safetensors` (recommended; config kept in metadata) or
    `.pth`/`.pt` via `torch.save` (loads with `weights_only=True`). Returns the path."""
    path = Path(path)
    if path.suffix not in BOOK_SUFFIXES:
        raise ValueError(f"book output {path} must end with one of {list(BOOK_SUFFIXES)}")
    check_writable(path, overwrite)
    sd = to_book_state_dict(config, params)
    if path.suffix == ".safetensors":
        write_safetensors(path, sd, {_META_KEY: json.dumps(config.to_dict())})
    else:
        write_torch(path, sd)
    return path
