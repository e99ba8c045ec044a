"""Start training from pretrained weights (`train.py --init-from SOURCE`): the source read into
host memory, the model config its shapes fix, and its params placed shard by shard.

Any source `jaxgpt.load` reads serves: `gpt2`...`gpt2-xl` by name, an OpenAI or Hugging
Face folder, a `.safetensors` or book `.pth` file, a jaxgpt run folder or `.npz`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig, get_preset
from jaxgpt.model import Params, flatten_params, to_layout, unflatten_params
from jaxgpt.tokenizer import get_encoding

log = logging.getLogger(__name__)

# What a weights file fixes; a flag or preset that says otherwise contradicts the weights.
SHAPE_FIELDS = (
    "vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias",
    "tie_embeddings",
)  # fmt: skip


@dataclass(frozen=True)
class Source:
    """Pretrained weights on the host: their config, canonical params (unrolled layers, no
    vocabulary padding, NumPy arrays) and `jaxgpt.checkpoint.fingerprint` of them."""

    spec: str
    format: str
    config: GPTConfig
    params: dict[str, np.ndarray]  # flat: "trf_blocks_0/att/W_query/kernel" -> array
    fingerprint: str

    def info(self) -> dict[str, str]:
        """What `config.json` records of the source."""
        return {"source": self.spec, "format": self.format, "fingerprint": self.fingerprint}


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Arrays made inside live in host memory (JAX's CPU device), not on an accelerator."""
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend in this process: the default device then
        yield
        return
    with jax.default_device(cpu):
        yield


def read_weights(
    spec: str, *, flag: str, cache_dir: str | Path | None = None, n_heads: int | None = None
) -> tuple[str, GPTConfig, Params]:
    """(format, config, params) of `spec` via `jaxgpt.load`, on the default device.

    Args:
      spec: a path or a named OpenAI model (downloaded into `cache_dir` when missing).
      flag: the command-line flag that named it, for error messages.
      cache_dir: cache root of named OpenAI models (default ~/.cache/jaxgpt/openai).
      n_heads: heads for files that do not say (a book state dict of a width no GPT-2
        size has); a file that does say must agree.

    Raises:
      FileNotFoundError: `spec` is neither a path nor a named model.
      ValueError: the weights are unreadable, or disagree with `n_heads`.
    """
    from jaxgpt import interop  # the weights formats: imported when used

    if spec not in interop.OPENAI_SIZES and not Path(spec).exists():
        raise FileNotFoundError(
            f"{flag} {spec!r} does not exist; pass a weights file or folder, a jaxgpt run "
            f"folder, or one of {list(interop.OPENAI_SIZES)}"
        )
    try:
        config, params = interop.load(spec, cache_dir=cache_dir)
    except ValueError as e:
        if n_heads is None or "cannot infer n_heads" not in str(e):
            raise
        config, params = interop.load(spec, {"n_heads": n_heads}, cache_dir=cache_dir)
    if n_heads is not None and n_heads != config.n_heads:
        raise ValueError(
            _contradiction(f"--n-heads {n_heads}", "n_heads", config.n_heads, spec, flag)
        )
    return interop.detect_format(spec), config, params


def load_source(
    spec: str, *, cache_dir: str | Path | None = None, n_heads: int | None = None
) -> Source:
    """`read_weights` into host memory, fingerprinted there; a path is recorded absolute."""
    from jaxgpt import checkpoint

    with on_host():
        fmt, config, params = read_weights(
            spec, flag="--init-from", cache_dir=cache_dir, n_heads=n_heads
        )
        fingerprint = checkpoint.fingerprint(params)
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    recorded = str(Path(spec).resolve()) if Path(spec).exists() else spec
    return Source(recorded, fmt, config, flat, fingerprint)


def _contradiction(claim: str, field: str, theirs: Any, spec: str, source_flag: str) -> str:
    return (
        f"{claim} contradicts the weights of {source_flag} {spec!r} ({field}={theirs}); drop "
        "it: the model's shape comes from the weights"
    )


def model_config(source: Source, *, preset: str | None = None, **flags: Any) -> GPTConfig:
    """The fine-tune's GPTConfig: the source's shape, with the settings in `flags` that do not
    change it (drop_rate, dtype, attention, scan_layers, remat, vocab_pad) applied.

    A shape flag (`context_length`, `emb_dim`, `n_layers`, `n_heads`) or a `preset` whose
    shape differs from the weights is an error naming both values; `context_length` may be
    shorter than the weights' (the position table keeps its first rows).
    """
    theirs = source.config
    ctx = flags.pop("context_length", None) or theirs.context_length
    if ctx > theirs.context_length:
        raise ValueError(
            f"--context-length {ctx} is longer than the context of the weights of --init-from "
            f"{source.spec!r} ({theirs.context_length} positions); pass at most "
            f"{theirs.context_length} (a shorter one keeps the first positions)"
        )
    claims = [(f"--{k.replace('_', '-')} {v}", k, v) for k, v in flags.items() if k in SHAPE_FIELDS]
    if preset is not None:
        p = get_preset(preset)
        claims += [
            (f"--model {preset} ({k}={getattr(p, k)})", k, getattr(p, k)) for k in SHAPE_FIELDS
        ]
    for claim, field, value in claims:
        if value != getattr(theirs, field):
            theirs_value = getattr(theirs, field)
            raise ValueError(_contradiction(claim, field, theirs_value, source.spec, "--init-from"))
    settings = {k: v for k, v in flags.items() if k not in SHAPE_FIELDS}
    return theirs.replace(**settings, context_length=ctx)


def check_source(source: Source, config: GPTConfig) -> None:
    """Raise ValueError when `config` is not a model the source's weights fit (a shape field
    differs, but for a shorter context) or their vocabulary cannot read GPT-2 tokens."""
    for field in SHAPE_FIELDS:
        mine, theirs = getattr(config, field), getattr(source.config, field)
        shorter = field == "context_length" and mine <= theirs
        if mine != theirs and not shorter:
            raise ValueError(
                f"model {field}={mine} does not fit the weights of {source.spec!r} "
                f"({field}={theirs}); build the config with jaxgpt.finetune.model_config"
            )
    tokens = get_encoding().n_vocab
    if config.vocab_size < tokens:
        raise ValueError(
            f"--init-from {source.spec!r} has a vocabulary of {config.vocab_size} tokens, fewer "
            f"than the {tokens} of the GPT-2 tokenizer the corpus is encoded with; pass weights "
            "of a GPT-2 vocabulary"
        )


def place(source: Source, config: GPTConfig, shardings: Any) -> Params:
    """The source's params in `config`'s layout (position table cut to its context, layers
    stacked when scanned, vocabulary padded), each device receiving only its own shards of
    each leaf (`jax.make_array_from_callback`), never the whole model.

    Args:
      shardings: a pytree of `jax.sharding.Sharding` matching `config`'s params.
    """
    flat = dict(source.params)
    flat["pos_emb/embedding"] = flat["pos_emb/embedding"][: config.context_length]
    with on_host():  # the layout change runs in host memory
        tree = to_layout(unflatten_params(flat), config)
        tree = jax.tree.map(np.asarray, tree)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings
    )
