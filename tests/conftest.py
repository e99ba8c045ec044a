"""Shared fixtures: tiny config, root key, the corpus under tests/fixtures. Configures JAX before
it starts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import jax

# Two CPU devices make sharding tests real on a 2-core machine; rank promotion is an error so
# silent broadcasting bugs surface. Both must be set before the first JAX computation.
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402
from skipreport import pytest_terminal_summary  # noqa: E402, F401  (the CI's skip report)

from jaxgpt.config import GPTConfig, get_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The suite carries what it reads: a fresh clone with nothing beside it runs every test.
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    gpu = _has_gpu()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "torch" in item.keywords and not has_torch:
            item.add_marker(pytest.mark.skip(reason="needs torch (pip install -e .[torch])"))


@pytest.fixture(scope="session")
def tiny_config() -> GPTConfig:
    """emb 32, 2 layers, 2 heads, context 16, full GPT-2 vocabulary, no dropout."""
    return get_preset("tiny")


@pytest.fixture(scope="session")
def small_vocab_config() -> GPTConfig:
    """The tiny config with a 97-token vocabulary, for fast model-only checks."""
    return get_preset("tiny").replace(vocab_size=97)


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(scope="session")
def verdict_text() -> str:
    """The book's corpus, "The Verdict" (Edith Wharton, 1908, public domain)."""
    return (FIXTURES / "the-verdict.txt").read_text(encoding="utf-8")


class _Compiles(logging.Handler):
    """(thread name, program) of every XLA compilation JAX logs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            program = message.split(" of ", 1)[1].split(" in ")[0]
            self.seen.append((threading.current_thread().name, program))


@pytest.fixture
def compiles() -> Iterator[list[tuple[str, str]]]:
    """(thread name, program, e.g. "jit(train_step)") of each XLA compilation in the test."""
    seen = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(seen)
    jax.config.update("jax_log_compiles", True)  # process-wide: the context form is per thread
    try:
        yield seen.seen
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(seen)
