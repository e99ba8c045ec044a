"""Cross-entropy (mean over tokens) and perplexity; pure functions of logits and targets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, as `torch.nn.functional.cross_entropy` in the book.

    Args:
      logits: float (batch, seq, vocab).
      targets: int (batch, seq) token ids.

    Returns:
      float32 scalar.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match targets {tuple(targets.shape)}"
        )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (batch, seq, vocab)
    picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -picked.mean()


def perplexity(loss: jax.Array | float) -> jax.Array:
    """exp(mean cross-entropy): the effective number of equally likely next tokens."""
    return jnp.exp(jnp.asarray(loss, jnp.float32))


def token_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    tied: bool = False,
    precision: jax.lax.Precision | None = None,
    vocab: int | None = None,
) -> jax.Array:
    """Each token's cross-entropy -log softmax(hidden @ head)[target], in float32: the terms
    `head_cross_entropy` averages (same arguments; no gradient of its own).

    Returns:
      float32 (tokens,).
    """
    logits = _head_logits(hidden, head, tied, precision, vocab)  # (tokens, vocab) float32
    picked = jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def head_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    tied: bool = False,
    precision: jax.lax.Precision | None = None,
    vocab: int | None = None,
) -> jax.Array:
    """`cross_entropy(hidden @ head, targets)` with the head fused into the loss.

    The (tokens, vocab) logits are materialised once, in float32, and turned in place into
    exp(logits - max), the residual of the backward pass, which scales it into
    softmax - one_hot in place again and feeds it to the two gradient matmuls. So exp runs
    once per logit (autodiff of log_softmax keeps logits, exp and log-probabilities alive,
    and a residual of logits would need exp again in the backward pass).

    Args:
      hidden: float (tokens, emb), the final LayerNorm output.
      head: float (emb, vocab), or (vocab, emb) when `tied` (the token embedding).
      targets: int (tokens,) token ids.
      tied: static; `head` is the (vocab, emb) embedding.
      precision: static matmul precision (`jaxgpt.model.precision(config)`).
      vocab: static; with a padded head, the real vocabulary size: logits of the padded
        columns are masked to -inf, so they take no probability and get no gradient.

    Returns:
      float32 scalar, the mean over tokens.
    """
    return _head_ce_fwd(hidden, head, targets, tied, precision, vocab)[0]


def _head_logits(hidden, head, tied, precision, vocab):  # (tokens, padded vocab) float32
    dims = (((1,), (1,)), ((), ())) if tied else (((1,), (0,)), ((), ()))
    logits = jax.lax.dot_general(
        hidden, head.astype(hidden.dtype), dims, precision, preferred_element_type=jnp.float32
    )
    if vocab is not None and vocab < logits.shape[1]:  # a padded vocabulary
        real = jnp.arange(logits.shape[1], dtype=jnp.int32)[None, :] < vocab  # (1, padded)
        logits = jnp.where(real, logits, -jnp.inf)
    return logits


def _head_ce_fwd(hidden, head, targets, tied, precision, vocab=None):
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be (tokens, emb) and targets "
            f"{tuple(targets.shape)} (tokens,)"
        )
    logits = _head_logits(hidden, head, tied, precision, vocab)  # (tokens, vocab)
    m = logits.max(axis=-1, keepdims=True)  # (tokens, 1); the custom VJP takes no grad of it
    picked = jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)
    e = jnp.exp(logits - m)  # (tokens, vocab), in the logits' buffer
    # (tokens, 1), >= 1 (the max's own term). A matrix-vector product with ones: XLA:CPU
    # runs it at twice the speed of the equivalent row sum fused with exp (52 vs 104 ms for
    # 1024 x 50257 logits); the order of the float32 additions differs, nothing else.
    ones = jnp.ones((e.shape[1], 1), e.dtype)
    s = jax.lax.dot_general(e, ones, (((1,), (0,)), ((), ())), precision)
    loss = (jnp.log(s) + m - picked).mean()
    return loss, (hidden, head, targets, e, s)


def _head_ce_bwd(tied, precision, vocab, res, g):
    hidden, head, targets, e, s = res
    n, vocab = e.shape
    hit = jnp.arange(vocab, dtype=jnp.int32)[None, :] == targets[:, None].astype(jnp.int32)
    # d loss / d logits = (softmax - one_hot) / tokens = (e / s - one_hot) * g / n, in place.
    scale = g / n
    d = (e * (scale / s) - jnp.where(hit, scale, 0.0)).astype(hidden.dtype)
    w = head.astype(hidden.dtype)
    if tied:  # head (vocab, emb)
        d_hidden = jax.lax.dot_general(d, w, (((1,), (0,)), ((), ())), precision)
        d_head = jax.lax.dot_general(d, hidden, (((0,), (0,)), ((), ())), precision)
    else:  # head (emb, vocab)
        d_hidden = jax.lax.dot_general(d, w, (((1,), (1,)), ((), ())), precision)
        # hidden^T @ d with hidden^T copied out first (emb x tokens, ~1 MB): XLA:CPU's matmul
        # with a transposed left operand ran 135 vs 95 ms for small's 1024 x 256 x 50257; the
        # barrier keeps XLA from folding the copy back into the dot.
        hidden_t = jax.lax.optimization_barrier(hidden.T)  # (emb, tokens)
        d_head = jax.lax.dot_general(hidden_t, d, (((1,), (0,)), ((), ())), precision)
    d_targets = np.zeros(targets.shape, jax.dtypes.float0)
    return d_hidden, d_head.astype(head.dtype), d_targets


head_cross_entropy.defvjp(_head_ce_fwd, _head_ce_bwd)
