"""Text generation. (Placeholder-free minimal version: greedy, uncached; the sampling issue
replaces it with the KV-cache implementation under the same signature.)"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT, Params


def generate(
    params: Params,
    config: GPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    num_beams: int = 1,
    key: jax.Array | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, as the book's `generate_text_simple`."""
    if temperature != 0.0 or top_k or top_p or num_beams != 1:
        raise NotImplementedError("only greedy decoding is implemented so far")
    model = GPT(config)
    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids)[:, -1])
    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(max_new_tokens):
            nxt = int(jnp.argmax(apply(params, jnp.asarray([ids[-config.context_length :]]))))
            ids.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
        out.append(ids)
    return out
