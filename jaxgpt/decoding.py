"""What one compiled generate program is: its static plan and its traced scalars. Shared by
`jaxgpt.sampling` (the decode loop) and `jaxgpt.beam` (the beam update it plugs in), so
imports run one way: decoding <- beam <- sampling.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxgpt.config import GPTConfig


class Plan(NamedTuple):
    """Everything static about one compiled generate program (the jit cache key)."""

    config: GPTConfig
    batch: int  # padded number of prompts
    prefill_len: int  # padded prompt length fed in the prefill
    cache_len: int  # KV-cache slots; positions fed with the cache are < cache_len
    buf_len: int  # token buffer per row: prompt + new tokens, padded
    overflow: bool  # some row may outgrow the cache: compile the sliding-window phase
    greedy: bool
    top_k: int | None
    use_top_p: bool
    use_eos: bool
    num_beams: int


class Dyn(NamedTuple):
    """Traced scalars: changing them does not recompile."""

    n_new: jax.Array  # int32, max_new_tokens
    temperature: jax.Array  # float32
    top_p: jax.Array  # float32
    eos_id: jax.Array  # int32
    length_penalty: jax.Array  # float32
