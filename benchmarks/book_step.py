"""The book's PyTorch training step, for the benchmarks that set jaxgpt against it.

Imports neither JAX nor jaxgpt, so a process that runs only this step (bench_memory.py's
PyTorch side) holds no JAX runtime in its memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def make_torch(
    cfg: Any, batch: int, seq: int, *, fused: bool, compile_model: bool
) -> Callable[[], None]:
    """The book's PyTorch step (ch. 5 `train_model_simple` body) on random tokens; `cfg` is any
    object with GPTConfig's fields (a GPTConfig, or a namespace where JAX must not load)."""
    import torch
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(123)
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate")
    model = GPTModel({**{k: getattr(cfg, k) for k in keys}, "qkv_bias": cfg.qkv_bias})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=fused or None)
    forward = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)

    def run() -> None:
        opt.zero_grad()
        logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()

    return run
