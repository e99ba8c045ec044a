"""Score a model on a text: mean loss, perplexity and bits per byte over every token but the
first, each predicted exactly once.

Windows of `context_length` input tokens start every `stride` tokens (targets shifted by one,
as the book's windows); each token is scored in the first window that holds it as a target,
so with a stride below the context every window after the first scores its last `stride`
targets with the tokens before them as context (Hugging Face's "Perplexity of fixed-length
models" method for GPT-2). The last window is cut at the end of the text.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.losses import token_cross_entropy
from jaxgpt.model import GPT, Params, head_matrix, precision
from jaxgpt.tokenizer import token_byte_lengths

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # inputs, targets int32, mask bool (b, seq)


@dataclass(frozen=True)
class Windows:
    """Where each window reads: all (n_windows,) int64."""

    starts: np.ndarray  # its first input token
    lengths: np.ndarray  # its inputs (= its targets), at most the context length
    first: np.ndarray  # index among its targets of the first one it scores

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def scored(self) -> int:
        """Targets scored over all windows: every token of the text but the first."""
        return int((self.lengths - self.first).sum())


def windows(n_tokens: int, context_length: int, stride: int) -> Windows:
    """The windows that score `n_tokens` tokens; see the module docstring.

    Raises:
      ValueError: fewer than 2 tokens, or a stride that is not in [1, context_length] (a
        longer one would skip the tokens between windows).
    """
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); scoring needs at least 2")
    if not 0 < stride <= context_length:
        raise ValueError(
            f"--stride {stride} must be in 1..{context_length} (the context length): a longer "
            "stride would leave the tokens between windows unscored"
        )
    n = 1 + max(0, -(-(n_tokens - 1 - context_length) // stride))
    starts = np.arange(n, dtype=np.int64) * stride
    lengths = np.minimum(context_length, n_tokens - 1 - starts)
    ends = starts + lengths  # (n,) position of each window's last target
    first = np.concatenate([[0], ends[:-1]]) - starts  # targets already scored before it
    return Windows(starts, lengths, first)


def batches(tokens: Any, w: Windows, context_length: int, batch_size: int) -> Iterator[Batch]:
    """(inputs, targets, mask) of `batch_size` windows padded to `context_length`: the padding
    (a cut last window, the rows after the last window) is token 0, masked out."""
    pos = np.arange(context_length)[None, :]  # (1, seq)
    for b in range(0, len(w), batch_size):
        rows = slice(b, b + batch_size)
        starts, lengths, first = w.starts[rows, None], w.lengths[rows, None], w.first[rows, None]
        valid = pos < lengths  # (rows, seq)
        inputs = tokens[np.where(valid, starts + pos, 0)].astype(np.int32)
        targets = tokens[np.where(valid, starts + pos + 1, 0)].astype(np.int32)
        mask = valid & (pos >= first)
        pad = ((0, batch_size - len(mask)), (0, 0))
        yield np.pad(inputs, pad), np.pad(targets, pad), np.pad(mask, pad)


@functools.cache  # one jitted step per config: `precompile` compiles the one `score` runs
def make_score_step(config: GPTConfig) -> Callable[[Params, Any, Any, Any], jax.Array]:
    """A jitted `step(params, inputs, targets, mask) -> float32` sum of the masked tokens'
    cross-entropy (nats). The head runs one row at a time, so only one window's logits
    (seq, vocab) exist at once."""
    model = GPT(config)

    def step(params: Params, inputs: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = model.apply({"params": params}, inputs, True, method=GPT.hidden)  # (b, seq, emb)
        head = head_matrix(config, params)
        prec = precision(config)

        def row(xs: tuple[jax.Array, jax.Array]) -> jax.Array:  # (seq,) nats
            h, t = xs
            return token_cross_entropy(h, head, t, config.tie_embeddings, prec, config.vocab_size)

        nats = jax.lax.map(row, (hidden, targets))  # (b, seq)
        return jnp.sum(jnp.where(mask, nats, 0.0))

    return jax.jit(step)


def precompile(params: Params, config: GPTConfig, context_length: int, batch_size: int) -> None:
    """Compile, without running, the program `score(params, config, tokens, context_length=
    context_length, batch_size=batch_size)` runs, whatever the text: its batches are always
    (batch_size, context_length). `params` may be ShapeDtypeStructs."""
    rows = jax.ShapeDtypeStruct((batch_size, context_length), jnp.int32)  # (batch, seq)
    mask = jax.ShapeDtypeStruct((batch_size, context_length), jnp.bool_)
    make_score_step(config).lower(params, rows, rows, mask).compile()


@dataclass(frozen=True)
class Score:
    """What `score` measured: total nats over `tokens` scored tokens of a `bytes`-byte text."""

    nats: float
    tokens: int
    bytes: int
    windows: int
    context_length: int
    stride: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per scored token, in nats."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Total bits over the UTF-8 bytes of the whole text (tokenizer-independent)."""
        return self.nats / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "nats": self.nats,
            "bytes": self.bytes,
            "windows": self.windows,
            "context_length": self.context_length,
            "stride": self.stride,
        }


def text_bytes(tokens: Any, vocab_size: int, chunk: int = 1 << 24) -> int:
    """UTF-8 bytes of the text `tokens` decode to (GPT-2's BPE is byte-level: each id stands
    for fixed bytes), read in chunks (`tokens` may be memory-mapped).

    Raises:
      ValueError: an id the model's vocabulary does not have.
    """
    lengths, total = token_byte_lengths(), 0
    for i in range(0, len(tokens), chunk):
        ids = np.asarray(tokens[i : i + chunk])
        top = int(ids.max())
        if top >= min(vocab_size, len(lengths)):
            raise ValueError(
                f"the text holds token id {top}, outside the model's vocabulary of {vocab_size}; "
                "score it with weights of a GPT-2 vocabulary"
            )
        total += int(lengths[ids].sum())
    return total


def score(
    params: Params,
    config: GPTConfig,
    tokens: Any,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> Score:
    """Score `tokens` (n,) (an array, memory map or `data.TokenShards`) under the model.

    Args:
      context_length: input tokens per window (default and maximum: the model's).
      stride: tokens between window starts, in [1, context_length] (default: the context).
      batch_size: windows per compiled call (the last batch is padded, so one program runs).
      on_batch: called with (windows scored so far, all windows) as batches finish.

    Raises:
      ValueError: a context longer than the model's, a bad stride or batch size, too short
        a text, or token ids outside the vocabulary.
    """
    ctx = context_length or config.context_length
    if not 0 < ctx <= config.context_length:
        raise ValueError(
            f"--context-length {ctx} must be in [1, {config.context_length}] (the model's "
            "context); pass at most that"
        )
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    w = windows(len(tokens), ctx, stride or ctx)
    nbytes = text_bytes(tokens, config.vocab_size)
    step, pending, sums = make_score_step(config), collections.deque(), []

    def finish_one() -> None:
        sums.append(float(pending.popleft()))  # waits for the oldest batch in flight
        if on_batch is not None:
            on_batch(min(len(sums) * batch_size, len(w)), len(w))

    for inputs, targets, mask in batches(tokens, w, ctx, batch_size):
        pending.append(step(params, inputs, targets, mask))
        # Two batches in flight: the device always has the next one queued, and the host
        # never cuts batches far ahead of it (a corpus may be larger than memory).
        if len(pending) > 2:
            finish_one()
    while pending:
        finish_one()
    nats = math.fsum(sums)  # float64 over the batches' float32 sums
    return Score(nats, w.scored, nbytes, len(w), ctx, stride or ctx)
