"""Fixtures for interop tests: the OpenAI-layout TF checkpoint and its expected outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.interop.common import expected_shapes, unflatten

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "openai-gpt2-tiny"


@pytest.fixture(scope="session")
def openai_dir() -> Path:
    """Real TensorFlow-written checkpoint in OpenAI's layout (n_embd 8, 2 layers, n_ctx 32)."""
    return FIXTURE


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    """Outputs of the book's TF loader + GPTModel on the fixture (see its README)."""
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def random_params() -> Callable[[GPTConfig, int], dict]:
    """Params of the model's tree (abstract init, no compile) with every leaf N(0, 0.3)."""

    def make(cfg: GPTConfig, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        shapes = expected_shapes(cfg)
        return unflatten(
            {k: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        )

    return make
