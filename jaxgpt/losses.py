"""Cross-entropy (mean over tokens) and perplexity; pure functions of logits and targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
