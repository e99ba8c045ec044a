"""Cross-entropy and perplexity against a direct NumPy log-softmax."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.losses import cross_entropy, perplexity


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
