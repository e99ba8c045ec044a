"""Hugging Face GPT-2 (`GPT2LMHeadModel` folders and state dicts) <-> jaxgpt (config, params).

HF's Conv1D stores weights as (in, out), which is Flax's kernel layout, so nothing is
transposed except the untied `lm_head.weight` (vocab, emb). QKV is fused in `c_attn`.
"""

from __future__ import annotations

import json
import math
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
    fuse_qkv,
    gives_heads,
    preset_heads,
    reconcile,
    split_qkv,
    tie_head,
    to_numpy,
)
from jaxgpt.interop.tensors import (
    check_writable,
    numpy_dict,
    read_json,
    read_safetensors,
    read_torch,
    write_safetensors,
)
from jaxgpt.model import Params

# Per-block names: HF suffix -> jaxgpt suffix (c_attn is split into W_query/W_key/W_value).
_BLOCK = {
    "ln_1.weight": "norm1/scale",
    "ln_1.bias": "norm1/shift",
    "attn.c_proj.weight": "att/out_proj/kernel",
    "attn.c_proj.bias": "att/out_proj/bias",
    "ln_2.weight": "norm2/scale",
    "ln_2.bias": "norm2/shift",
    "mlp.c_fc.weight": "ff/layers_0/kernel",
    "mlp.c_fc.bias": "ff/layers_0/bias",
    "mlp.c_proj.weight": "ff/layers_2/kernel",
    "mlp.c_proj.bias": "ff/layers_2/bias",
}
_TOP = {
    "wte.weight": "tok_emb/embedding",
    "wpe.weight": "pos_emb/embedding",
    "ln_f.weight": "final_norm/scale",
    "ln_f.bias": "final_norm/shift",
}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older versions saved
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _strip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the `transformer.` prefix (GPT2LMHeadModel) and causal-mask buffers."""
    out = {}
    for k, v in state.items():
        if k.endswith(_BUFFERS):
            continue
        out[k.removeprefix("transformer.")] = v
    return out


def config_from_hf(hf: Mapping[str, Any], source: str) -> GPTConfig:
    """GPTConfig from an HF GPT-2 config dict; rejects variants jaxgpt does not compute."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type={hf.get('model_type')!r}; only 'gpt2' is supported")
    n_embd = hf.get("n_embd", 768)
    checks = {
        "activation_function": hf.get("activation_function", "gelu_new")
        in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": math.isclose(hf.get("layer_norm_epsilon", 1e-5), 1e-5),
        "n_inner": hf.get("n_inner") in (None, 4 * n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": not hf.get("scale_attn_by_inverse_layer_idx", False),
    }
    bad = [f"{k}={hf.get(k)!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{source}: unsupported GPT-2 variant ({', '.join(bad)})")
    extra = hf.get("jaxgpt_config") or {}  # written by export_hf; fields HF has no slot for
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        emb_dim=n_embd,
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        drop_rate=float(hf.get("resid_pdrop", 0.1)),
        qkv_bias=extra.get("qkv_bias", True),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init=extra.get("init", "gpt2"),
        dtype=extra.get("dtype", "float32"),
        param_dtype=extra.get("param_dtype", "float32"),
        matmul_precision=extra.get("matmul_precision", "highest"),
    )


def _infer_config(sd: dict[str, np.ndarray], source: str, n_heads: int | None) -> GPTConfig:
    """Config from shapes alone (state dicts without an HF config)."""
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ValueError(f"{source}: no wte.weight/wpe.weight; not a GPT-2 state dict")
    vocab, emb = sd["wte.weight"].shape
    layers = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    return GPTConfig(
        vocab_size=vocab,
        context_length=sd["wpe.weight"].shape[0],
        emb_dim=emb,
        n_heads=preset_heads(emb) if n_heads is None else n_heads,
        n_layers=layers,
        drop_rate=0.0,
        qkv_bias=True,
        tie_embeddings="lm_head.weight" not in sd,
        init="gpt2",
    )


def _to_flat(sd: dict[str, np.ndarray], cfg: GPTConfig, source: str) -> tuple[Flat, bool]:
    left = dict(sd)

    def take(name: str) -> np.ndarray:
        if name not in left:
            raise ValueError(f"{source}: missing key {name!r}")
        return left.pop(name)

    flat = {dst: take(src) for src, dst in _TOP.items()}
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"trf_blocks_{i}"
        w, b = take(p + "attn.c_attn.weight"), take(p + "attn.c_attn.bias")
        if not cfg.qkv_bias and np.any(b):
            raise ValueError(f"{source}: {p}attn.c_attn.bias is non-zero; load with qkv_bias=True")
        flat.update(split_qkv(w, b if cfg.qkv_bias else None, q))
        flat.update({f"{q}/{dst}": take(p + src) for src, dst in _BLOCK.items()})
    head = left.pop("lm_head.weight", None)
    check_unused(left, source)
    tied = head is None or np.array_equal(head, flat["tok_emb/embedding"])
    if not tied:
        flat["out_head/kernel"] = np.ascontiguousarray(head.T)  # (emb, vocab)
    return flat, tied


def from_hf_state_dict(
    state_dict: Mapping[str, Any],
    config: ConfigLike = None,
    *,
    hf_config: Mapping[str, Any] | None = None,
    source: str = "HF state dict",
) -> tuple[GPTConfig, Params]:
    """Convert an HF GPT-2 state dict (torch tensors or arrays) to jaxgpt.

    Args:
      state_dict: `GPT2LMHeadModel.state_dict()` or `GPT2Model.state_dict()` (no prefix).
      config: optional GPTConfig, preset name or dict of overrides (see `jaxgpt.load`).
      hf_config: the HF config as a dict (`model.config.to_dict()`); without it, the config
        is inferred from shapes and n_heads from the GPT-2 size of that width.

    Returns:
      (config, params).
    """
    sd = _strip(numpy_dict(state_dict))
    if hf_config:
        inferred = config_from_hf(hf_config, source)
    else:  # placeholder n_heads=1 when the caller gives it
        inferred = _infer_config(sd, source, 1 if gives_heads(config) else None)
    if not inferred.tie_embeddings and "lm_head.weight" not in sd:
        raise ValueError(f"{source}: missing key 'lm_head.weight' (tie_word_embeddings is false)")
    cfg = reconcile(inferred, config, source)
    flat, tied = _to_flat(sd, cfg, source)
    flat = tie_head(flat, file_tied=tied, config=cfg, source=source)
    return cfg, build_params(flat, cfg, source)


def read_hf_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """Tensors of a `save_pretrained` folder: safetensors (single or sharded) or .bin."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")[0]
    if (folder / "model.safetensors.index.json").is_file():
        index = read_json(folder / "model.safetensors.index.json")
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            out.update(read_safetensors(folder / shard)[0])
        return out
    if (folder / "pytorch_model.bin").is_file():
        state = read_torch(folder / "pytorch_model.bin")
        if not isinstance(state, Mapping):
            raise ValueError(f"{folder / 'pytorch_model.bin'} holds no state dict")
        return numpy_dict(state)
    raise FileNotFoundError(f"{folder} has none of {list(_WEIGHT_FILES)}")


def load_hf(folder: str | Path, config: ConfigLike = None) -> tuple[GPTConfig, Params]:
    """Load a folder written by `GPT2LMHeadModel.save_pretrained` (config.json + weights)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: no config.json")
    hf_config = read_json(folder / "config.json")
    sd = read_hf_state_dict(folder)
    return from_hf_state_dict(sd, config, hf_config=hf_config, source=str(folder))


def to_hf_state_dict(config: GPTConfig, params: Params) -> dict[str, np.ndarray]:
    """jaxgpt params -> `GPT2LMHeadModel` state dict (NumPy, float32, no buffers).

    Without QKV bias, `c_attn.bias` is written as zeros (HF's GPT-2 always has it); a tied
    head writes no `lm_head.weight` (HF re-ties it), an untied one writes (vocab, emb).
    """
    flat = to_numpy(params, config)  # unrolled, vocabulary padding cut off
    sd = {f"transformer.{src}": flat[dst] for src, dst in _TOP.items()}
    for i in range(config.n_layers):
        p, q = f"transformer.h.{i}.", f"trf_blocks_{i}"
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = fuse_qkv(flat, q, config.emb_dim)
        sd.update({p + src: flat[f"{q}/{dst}"] for src, dst in _BLOCK.items()})
    if not config.tie_embeddings:
        sd["lm_head.weight"] = np.ascontiguousarray(flat["out_head/kernel"].T)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """An HF `config.json` for `config` (GPT2LMHeadModel, gelu_new, eps 1e-5)."""
    eos = 50256 if config.vocab_size > 50256 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": "float32",
        # Fields HF has no slot for, read back by config_from_hf for exact round trips.
        "jaxgpt_config": {
            "qkv_bias": config.qkv_bias,
            "init": config.init,
            "dtype": config.dtype,
            "param_dtype": config.param_dtype,
            "matmul_precision": config.matmul_precision,
        },
    }


def export_hf(
    config: GPTConfig, params: Params, folder: str | Path, *, overwrite: bool = False
) -> Path:
    """Write a folder that `GPT2LMHeadModel.from_pretrained(folder)` loads.

    Files: `config.json` and `model.safetensors` (float32). Returns the folder.
    """
    folder = Path(folder)
    check_writable(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", to_hf_state_dict(config, params))
    return folder
