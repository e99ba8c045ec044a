"""Cross-entropy and perplexity against a direct NumPy log-softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.losses import cross_entropy, head_cross_entropy, perplexity


def test_cross_entropy_equals_direct_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, size=(3, 5))
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp, targets[..., None], -1))
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    # float32 log-softmax over 11 classes: ~1e-7 relative error.
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    np.testing.assert_allclose(float(perplexity(got)), np.exp(expected), rtol=1e-6)


def test_uniform_logits_give_log_vocab():
    # Uniform predictions: loss = ln(V) exactly, perplexity = V.
    loss = cross_entropy(jnp.zeros((2, 4, 50257)), jnp.zeros((2, 4), jnp.int32))
    np.testing.assert_allclose(float(loss), np.log(50257), rtol=1e-6)
    np.testing.assert_allclose(float(perplexity(loss)), 50257, rtol=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"logits shape \(2, 3, 5\) does not match targets"):
        cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("tied", [False, True])
def test_head_cross_entropy_equals_unfused_value_and_grads(tied: bool) -> None:
    # Reference: autodiff of cross_entropy on explicitly materialised logits (float32).
    # Both sums run over the same 97 logits per token; differences are float32 rounding (~1e-7
    # relative), so 1e-6 bounds them.
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    tokens, emb, vocab = 12, 8, 97
    hidden = jax.random.normal(k1, (tokens, emb))
    head = jax.random.normal(k2, (vocab, emb) if tied else (emb, vocab))
    targets = jax.random.randint(k3, (tokens,), 0, vocab)

    def unfused(h, w):
        logits = h @ (w.T if tied else w)  # (tokens, vocab)
        return cross_entropy(logits[None], targets[None])

    def fused(h, w):
        return head_cross_entropy(h, w, targets, tied, jax.lax.Precision.HIGHEST)

    ref_val, ref_grads = jax.value_and_grad(unfused, argnums=(0, 1))(hidden, head)
    val, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_head_cross_entropy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="tokens"):
        head_cross_entropy(jnp.zeros((4, 8)), jnp.zeros((8, 5)), jnp.zeros((3,), jnp.int32))
