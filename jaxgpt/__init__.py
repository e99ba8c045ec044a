"""jaxgpt: the book's GPT-2 pretraining pipeline in pure-functional JAX/Flax."""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> module. Imported on first use, so light modules (the tokenizer, the data
# preparation workers) do not pay for importing JAX.
_EXPORTS = {
    "GPT": "jaxgpt.model",
    "PRESETS": "jaxgpt.config",
    "GPTConfig": "jaxgpt.config",
    "TrainConfig": "jaxgpt.config",
    "TrainState": "jaxgpt.step",
    "count_params": "jaxgpt.model",
    "export_book": "jaxgpt.interop",
    "export_hf": "jaxgpt.interop",
    "fit": "jaxgpt.train",
    "generate": "jaxgpt.sampling",
    "get_preset": "jaxgpt.config",
    "init_cache": "jaxgpt.model",
    "init_params": "jaxgpt.model",
    "init_train_state": "jaxgpt.step",
    "load": "jaxgpt.interop",
    "make_eval_step": "jaxgpt.step",
    "make_train_step": "jaxgpt.step",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
