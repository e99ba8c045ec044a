"""Cross-check: run a source file through its PyTorch reference model and through jaxgpt.

References: the book's `llms_from_scratch.ch04.GPTModel` for OpenAI, book and jaxgpt files
(OpenAI weights assigned by the book's own `load_weights_into_gpt`), and `transformers`
`GPT2LMHeadModel.from_pretrained` for Hugging Face folders. torch is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT, Params


def book_model(config: GPTConfig, state_dict: dict[str, Any] | None) -> Any:
    """`GPTModel` (eval mode, no dropout) with `state_dict` loaded strictly, if given."""
    import torch
    from llms_from_scratch.ch04 import GPTModel

    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")
    model = GPTModel({**{k: getattr(config, k) for k in keys}, "drop_rate": 0.0})
    if state_dict is not None:
        sd = {k: torch.as_tensor(np.array(v)) for k, v in state_dict.items()}
        model.load_state_dict(sd, strict=True)
    return model.eval()


def _openai_book_params(folder: Path, n_layers: int) -> dict[str, Any]:
    """The dict `llms_from_scratch.ch05.load_gpt2_params_from_tf_ckpt` builds, read without TF."""
    from jaxgpt.interop.openai import checkpoint_prefix
    from jaxgpt.interop.tfckpt import read_checkpoint

    params: dict[str, Any] = {"blocks": [{} for _ in range(n_layers)]}
    for name, array in read_checkpoint(checkpoint_prefix(folder)).items():
        parts = name.split("/")[1:]  # drop "model/"
        target = params
        if parts[0].startswith("h"):
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(array)
    return params


def reference_model(fmt: str, path: str | Path, config: GPTConfig, params: Params) -> Any:
    """The PyTorch model matching a source of format `fmt` ("openai", "hf", "book", "jaxgpt").

    `path` is a file or folder (for a named OpenAI model, its cache folder).
    """
    if fmt == "openai":
        from llms_from_scratch.ch05 import load_weights_into_gpt

        model = book_model(config, None)
        load_weights_into_gpt(model, _openai_book_params(Path(path), config.n_layers))
        return model.eval()
    if fmt == "hf" and Path(path).is_dir():
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(str(path)).eval()
    if fmt == "book":
        from jaxgpt.interop.book import read_book_file

        return book_model(config, read_book_file(path)[0])
    # jaxgpt files (and bare HF state-dict files) have no torch twin: go through the book.
    from jaxgpt.interop.book import to_book_state_dict

    return book_model(config, to_book_state_dict(config, params))


def max_logit_diff(
    model: Any, config: GPTConfig, params: Params, *, seed: int = 0, batch: int = 2, seq: int = 16
) -> float:
    """Largest |logit difference| between a torch model and jaxgpt on random token ids."""
    import torch

    seq = min(seq, config.context_length)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq))  # (b, s)
    with torch.no_grad():
        out = model(torch.as_tensor(ids))
    ref = getattr(out, "logits", out).float().numpy()  # HF returns an output object
    got = np.asarray(GPT(config).apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    return float(np.abs(ref - got).max())
