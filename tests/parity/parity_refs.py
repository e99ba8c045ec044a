"""Independent PyTorch references for the parity tests: the book's GPTModel, HF GPT-2."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jaxgpt.config import GPTConfig

torch = pytest.importorskip("torch")


def book_model(cfg: GPTConfig, seed: int = 0) -> Any:
    """`llms_from_scratch.ch04.GPTModel` with torch's default init under `seed`, eval mode."""
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(seed)
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")
    return GPTModel({**{k: getattr(cfg, k) for k in keys}, "drop_rate": 0.0}).eval()


def hf_model(cfg: GPTConfig, seed: int = 0) -> Any:
    """`transformers.GPT2LMHeadModel` (no dropout) with every value randomised under `seed`."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF starts biases at 0 and LayerNorms at 1/0: perturb everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(cfg: GPTConfig, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)  # (batch, seq)


def report(request: pytest.FixtureRequest, name: str, value: float) -> None:
    """Print a measured figure (visible with -s) and attach it to the test report."""
    print(f"\nPARITY {request.node.name} {name}={value:.3e}")
    request.node.user_properties.append((name, value))
