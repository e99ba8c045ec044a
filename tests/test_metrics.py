"""Metrics: rows, the JSONL log, truncation on resume, PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jaxgpt import metrics


def _row(step: int, loss: float) -> dict:
    return metrics.make_row(
        step=step, epoch=step / 10, tokens_seen=step * 64, train_loss=loss,
        val_loss=loss + 1, lr=1e-3, grad_norm=0.5, tokens_per_sec=100.0,
    )  # fmt: skip


def test_row_has_the_keys_and_perplexity_is_exp_loss() -> None:
    row = _row(3, 2.0)
    assert list(row) == list(metrics.ROW_KEYS)
    assert row["train_ppl"] == pytest.approx(math.e**2)
    assert row["val_ppl"] == pytest.approx(math.e**3)
    assert math.isnan(_row(1, float("nan"))["val_ppl"])
    with pytest.raises(ValueError, match="lacks"):
        metrics.make_row(step=1, train_loss=1.0, val_loss=1.0)


def test_log_append_read_truncate(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    assert metrics.read_rows(path) == []
    rows = [_row(s, 5.0 - s / 10) for s in (1, 6, 11)]
    for r in rows:
        metrics.append_row(path, r)
    assert metrics.read_rows(path) == rows
    metrics.truncate_rows(path, 6)
    assert metrics.read_rows(path) == rows[:2]


def test_plots_are_png_files(tmp_path: Path) -> None:
    for s in (1, 6, 11):
        metrics.append_row(tmp_path / metrics.METRICS_FILE, _row(s, 9.0 - s / 2))
    paths = metrics.write_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "perplexity.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics.write_plots(tmp_path / "empty") == []


def test_phase_timer_splits_compile_time_out_of_phases() -> None:
    import jax
    import jax.numpy as jnp

    timer = metrics.PhaseTimer()
    with timer:
        with timer.phase("work"):
            # A fresh function: tracing and compiling it raise JAX's compile events.
            jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
        with timer.phase("idle"):
            pass
    times = timer.summary()
    assert times["compile"] > 0 and times["work"] >= 0
    assert times["total"] == pytest.approx(
        sum(v for k, v in times.items() if k != "total"), abs=1e-2
    )
    # Outside the context the timer no longer listens.
    before = timer.seconds["compile"]
    jax.jit(lambda x: jnp.cos(x) - 2.0)(jnp.arange(5.0)).block_until_ready()
    assert timer.seconds["compile"] == before
