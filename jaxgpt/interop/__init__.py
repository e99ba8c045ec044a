"""Weight interop: `load` detects a format (OpenAI TF folder, named OpenAI model, Hugging Face
folder, the book's PyTorch files, jaxgpt checkpoints) and returns (GPTConfig, params)."""

from __future__ import annotations

from pathlib import Path

from jaxgpt.config import GPTConfig
from jaxgpt.interop.book import (
    export_book,
    from_book_state_dict,
    load_book,
    to_book_state_dict,
)
from jaxgpt.interop.common import ConfigLike
from jaxgpt.interop.download import OPENAI_BASE_URL, OPENAI_SIZES, fetch_openai
from jaxgpt.interop.hf import export_hf, from_hf_state_dict, is_hf_folder, load_hf, to_hf_state_dict
from jaxgpt.interop.openai import is_openai_folder, load_openai
from jaxgpt.interop.optimizer import (
    AdamWMoments,
    adamw_from_torch,
    book_train_state,
    load_book_optimizer,
)
from jaxgpt.interop.tensors import read_safetensors, safetensors_keys
from jaxgpt.model import Params

__all__ = [
    "FORMATS",
    "OPENAI_BASE_URL",
    "AdamWMoments",
    "adamw_from_torch",
    "book_train_state",
    "detect_format",
    "export_book",
    "export_hf",
    "fetch_openai",
    "from_book_state_dict",
    "from_hf_state_dict",
    "load",
    "load_book",
    "load_book_optimizer",
    "load_hf",
    "load_openai",
    "to_book_state_dict",
    "to_hf_state_dict",
]

FORMATS = ("openai", "hf", "book", "jaxgpt")


def detect_format(path: str | Path) -> str:
    """Name the format of a path or named OpenAI model: "openai", "hf", "book" or "jaxgpt"."""
    p = Path(path)
    if str(path) in OPENAI_SIZES and not p.exists():
        return "openai"
    if p.is_dir():
        if is_openai_folder(p):
            return "openai"
        if is_hf_folder(p):
            return "hf"
        return "jaxgpt"
    if p.suffix in (".pth", ".pt"):
        return "book"
    if p.suffix == ".safetensors":
        keys = safetensors_keys(p)  # header only: tells book from HF from jaxgpt
        if "tok_emb.weight" in keys:
            return "book"
        if any(k.endswith("wte.weight") for k in keys):
            return "hf"
    return "jaxgpt"


def load(
    path: str | Path,
    config: ConfigLike = None,
    *,
    format: str | None = None,
    cache_dir: str | Path | None = None,
    base_url: str = OPENAI_BASE_URL,
    verify: bool = True,
    progress: bool = True,
) -> tuple[GPTConfig, Params]:
    """Load weights of any supported format as (GPTConfig, params).

    Args:
      path: an OpenAI GPT-2 folder; a named OpenAI model ("gpt2", "gpt2-medium",
        "gpt2-large", "gpt2-xl": read from `cache_dir`, downloaded when missing); a Hugging
        Face `save_pretrained` folder or `.safetensors` state dict; the book's `.pth`/`.pt`
        state dict or {"model_state_dict", "optimizer_state_dict"} checkpoint or exported
        `.safetensors`; or a jaxgpt run folder / params file (via `jaxgpt.checkpoint.load`).
      config: needed only where a file does not fix n_heads (book files whose width is no
        GPT-2 size): a GPTConfig (taken whole; its shape fields must agree with the file), a
        preset name (its n_heads), or a dict of field overrides such as {"n_heads": 4}.
      format: skip detection ("openai", "hf", "book", "jaxgpt").
      cache_dir: cache root for named OpenAI models (default $XDG_CACHE_HOME/jaxgpt/openai, else
        ~/.cache/jaxgpt/openai).
      base_url: where named OpenAI models are downloaded from.
      verify: check TF checkpoint CRC-32C checksums.
      progress: show download progress bars.

    Returns:
      (config, params) with params a nested dict of float32 arrays.
    """
    fmt = detect_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt == "openai":
        folder = Path(path)
        if str(path) in OPENAI_SIZES and not folder.exists():
            folder = fetch_openai(str(path), cache_dir, base_url=base_url, progress=progress)
        return load_openai(folder, config, verify=verify)
    if fmt == "hf":
        if Path(path).is_file():
            tensors, _ = read_safetensors(path)
            return from_hf_state_dict(tensors, config, source=str(path))
        return load_hf(path, config)
    if fmt == "book":
        return load_book(path, config)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist (nor is it a named OpenAI model)")
    from jaxgpt import checkpoint  # written alongside training; imported only when needed

    cfg, params = checkpoint.load(path)
    if config is not None:
        from jaxgpt.interop.common import reconcile

        reconcile(cfg, config, str(path))
    return cfg, params
