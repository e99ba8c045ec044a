"""jaxgpt: the book's GPT-2 pretraining pipeline in pure-functional JAX/Flax."""

from jaxgpt.config import PRESETS, GPTConfig, TrainConfig, get_preset
from jaxgpt.interop import export_book, export_hf, load
from jaxgpt.model import GPT, count_params, init_cache, init_params
from jaxgpt.sampling import generate
from jaxgpt.train import TrainState, fit, init_train_state, make_eval_step, make_train_step

__all__ = [
    "GPT",
    "PRESETS",
    "GPTConfig",
    "TrainConfig",
    "TrainState",
    "count_params",
    "export_book",
    "export_hf",
    "fit",
    "generate",
    "get_preset",
    "init_cache",
    "init_params",
    "init_train_state",
    "load",
    "make_eval_step",
    "make_train_step",
]
