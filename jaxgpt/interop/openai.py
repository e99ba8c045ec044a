"""OpenAI's original GPT-2 folders (hparams.json + TF checkpoint) -> jaxgpt (config, params)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interop.common import ConfigLike, Flat, build_params, check_unused, reconcile, split_qkv
from jaxgpt.interop.common import tie_head as _tie_head
from jaxgpt.interop.tfckpt import read_checkpoint
from jaxgpt.model import Params

# Files a folder needs to be loaded (OpenAI also publishes encoder.json, vocab.bpe, .meta).
REQUIRED_FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.index",
    "model.ckpt.data-00000-of-00001",
)
# Per-block names: OpenAI suffix -> jaxgpt suffix. Conv1D weights are (1, in, out); the
# leading 1 is dropped and (in, out) is already Flax's kernel layout. c_attn is split below.
_BLOCK = {
    "ln_1/g": "norm1/scale",
    "ln_1/b": "norm1/shift",
    "attn/c_proj/w": "att/out_proj/kernel",
    "attn/c_proj/b": "att/out_proj/bias",
    "ln_2/g": "norm2/scale",
    "ln_2/b": "norm2/shift",
    "mlp/c_fc/w": "ff/layers_0/kernel",
    "mlp/c_fc/b": "ff/layers_0/bias",
    "mlp/c_proj/w": "ff/layers_2/kernel",
    "mlp/c_proj/b": "ff/layers_2/bias",
}
_TOP = {
    "model/wte": "tok_emb/embedding",
    "model/wpe": "pos_emb/embedding",
    "model/ln_f/g": "final_norm/scale",
    "model/ln_f/b": "final_norm/shift",
}


def is_openai_folder(path: Path) -> bool:
    return path.is_dir() and (path / "hparams.json").is_file() and (path / "checkpoint").is_file()


def openai_config(hparams: dict) -> GPTConfig:
    """GPTConfig from OpenAI's hparams.json: QKV bias, tied head, no dropout (inference)."""
    try:
        return GPTConfig(
            vocab_size=hparams["n_vocab"],
            context_length=hparams["n_ctx"],
            emb_dim=hparams["n_embd"],
            n_heads=hparams["n_head"],
            n_layers=hparams["n_layer"],
            drop_rate=0.0,
            qkv_bias=True,
            tie_embeddings=True,
            init="gpt2",
        )
    except KeyError as e:
        need = "n_vocab, n_ctx, n_embd, n_head, n_layer"
        raise ValueError(f"hparams.json lacks {e}; it needs {need}") from e


def checkpoint_prefix(folder: Path) -> Path:
    """Resolve the prefix named in the folder's `checkpoint` file (relative to the folder)."""
    text = (folder / "checkpoint").read_text(encoding="utf-8")
    m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
    if m is None:
        raise ValueError(f"{folder / 'checkpoint'} names no model_checkpoint_path")
    prefix = Path(m.group(1))
    return prefix if prefix.is_absolute() else folder / prefix


def to_flat(tensors: dict[str, np.ndarray], n_layers: int, source: str) -> Flat:
    """Rename OpenAI variables to flat jaxgpt paths (untied: no out_head)."""
    left = dict(tensors)

    def take(name: str, squeeze: bool = False) -> np.ndarray:
        if name not in left:
            raise ValueError(f"{source}: missing variable {name!r}")
        x = left.pop(name)
        if squeeze:
            if x.ndim != 3 or x.shape[0] != 1:
                raise ValueError(f"{source}: {name} has shape {x.shape}; expected (1, in, out)")
            x = x[0]
        return x

    flat = {dst: take(src) for src, dst in _TOP.items()}
    for i in range(n_layers):
        p, q = f"model/h{i}/", f"trf_blocks_{i}"
        w, b = take(p + "attn/c_attn/w", squeeze=True), take(p + "attn/c_attn/b")
        flat.update(split_qkv(w, b, q))
        for src, dst in _BLOCK.items():
            flat[f"{q}/{dst}"] = take(p + src, squeeze=src.endswith("/w"))
    check_unused(left, source)
    return flat


def load_openai(
    folder: str | Path, config: ConfigLike = None, *, verify: bool = True
) -> tuple[GPTConfig, Params]:
    """Load an OpenAI GPT-2 folder (what the book's `gpt_download.py` fetches), no TensorFlow.

    Args:
      folder: holds hparams.json, checkpoint, model.ckpt.index, model.ckpt.data-00000-of-00001.
      config: optional GPTConfig, preset name or dict of overrides (see `jaxgpt.load`).
      verify: check CRC-32C checksums of the index and every tensor.

    Returns:
      (config, params); the config has context n_ctx, QKV bias, tied head, drop_rate 0.
    """
    folder = Path(folder)
    missing = [f for f in ("checkpoint", "hparams.json") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an OpenAI GPT-2 folder: missing {missing}")
    source = str(folder)
    hparams = json.loads((folder / "hparams.json").read_text(encoding="utf-8"))
    inferred = openai_config(hparams)
    cfg = reconcile(inferred, config, source)
    flat = to_flat(read_checkpoint(checkpoint_prefix(folder), verify=verify), cfg.n_layers, source)
    flat = _tie_head(flat, file_tied=True, config=cfg, source=source)
    return cfg, build_params(flat, cfg, source)
