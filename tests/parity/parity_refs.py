"""Independent PyTorch references for the parity tests: the book's GPTModel, HF GPT-2."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jaxgpt.config import GPTConfig

torch = pytest.importorskip("torch")


def randomize_(model: Any, seed: int, scale: float = 0.1) -> Any:
    """Add seeded N(0, scale^2) noise to every parameter of a torch module, in place.

    Fresh models start LayerNorm scales at 1 and shifts at 0 (HF also biases at 0), where a
    converter that swaps two norms or drops a bias computes the same logits; after this every
    value counts. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def book_model(cfg: GPTConfig, seed: int = 0) -> Any:
    """`llms_from_scratch.ch04.GPTModel` (no dropout, eval mode): torch's default init under
    `seed`, then every parameter randomised (`randomize_`)."""
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(seed)
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")
    model = GPTModel({**{k: getattr(cfg, k) for k in keys}, "drop_rate": 0.0}).eval()
    return randomize_(model, seed)


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
    return randomize_(transformers.GPT2LMHeadModel(hf_cfg).eval(), seed)


def random_ids(cfg: GPTConfig, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)  # (batch, seq)


def report(request: pytest.FixtureRequest, name: str, value: float) -> None:
    """Print a measured figure (visible with -s) and attach it to the test report."""
    print(f"\nPARITY {request.node.name} {name}={value:.3e}")
    request.node.user_properties.append((name, value))
