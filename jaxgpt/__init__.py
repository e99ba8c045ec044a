"""jaxgpt: the book's GPT-2 pretraining pipeline in pure-functional JAX/Flax."""

from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.model import GPT, count_params, init_cache, init_params

__all__ = [
    "GPT",
    "PRESETS",
    "GPTConfig",
    "count_params",
    "get_preset",
    "init_cache",
    "init_params",
]
