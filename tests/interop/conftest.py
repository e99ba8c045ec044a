"""Fixtures for interop tests: the OpenAI-layout TF checkpoint and its expected outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
