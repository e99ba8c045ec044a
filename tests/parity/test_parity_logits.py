"""Logits parity on random weights: jaxgpt vs the book's GPTModel and HF GPT2LMHeadModel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_refs import book_model, hf_model, random_ids, report

import jaxgpt.interop as interop
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

CONFIGS = {
    "tiny": GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2),
    "odd": GPTConfig(vocab_size=211, context_length=32, emb_dim=48, n_heads=3, n_layers=3),
    "fullvocab": GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=8, n_layers=1),
}
# fp32 on CPU, same formulas in a different summation order: errors ~1e-6 of logits of size
# ~1-10; 1e-4 is the bound.
ATOL = 1e-4


def _logits(cfg: GPTConfig, params: dict, ids: np.ndarray) -> np.ndarray:
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("size", list(CONFIGS))
def test_book_gptmodel(size: str, qkv_bias: bool, request: pytest.FixtureRequest) -> None:
    cfg = CONFIGS[size].replace(qkv_bias=qkv_bias, drop_rate=0.0)
    model = book_model(cfg)
    ids = random_ids(cfg, (2, cfg.context_length))
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    got_cfg, params = interop.from_book_state_dict(model.state_dict(), cfg)
    diff = float(np.abs(_logits(got_cfg, params, ids) - want).max())
    report(request, "max_abs_logit_diff", diff)
    assert diff <= ATOL


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("size", ["tiny", "odd"])
def test_hf_gpt2(size: str, tie: bool, request: pytest.FixtureRequest) -> None:
    cfg = CONFIGS[size].replace(qkv_bias=True, tie_embeddings=tie, drop_rate=0.0)
    model = hf_model(cfg)
    ids = random_ids(cfg, (2, cfg.context_length))
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).logits.numpy()
    got_cfg, params = interop.from_hf_state_dict(
        model.state_dict(), hf_config=model.config.to_dict()
    )
    assert got_cfg.tie_embeddings == tie
    diff = float(np.abs(_logits(got_cfg, params, ids) - want).max())
    report(request, "max_abs_logit_diff", diff)
    assert diff <= ATOL


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "atol"), [("highest", 1e-4), ("default", 2e-2)])
def test_book_gptmodel_on_gpu(precision: str, atol: float, request: pytest.FixtureRequest) -> None:
    # jaxgpt on the GPU against the book's model on the CPU. "default" lets XLA use TF32
    # matmuls (10-bit mantissa, ~5e-4 relative per product), so the bound is looser.
    cfg = CONFIGS["fullvocab"].replace(qkv_bias=True, drop_rate=0.0, matmul_precision=precision)
    model = book_model(cfg)
    ids = random_ids(cfg, (4, cfg.context_length))
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    got_cfg, params = interop.from_book_state_dict(model.state_dict(), cfg)
    gpu = jax.devices("gpu")[0]
    params, ids_dev = jax.device_put((params, jnp.asarray(ids, jnp.int32)), gpu)
    got = np.asarray(GPT(got_cfg).apply({"params": params}, ids_dev))
    diff = float(np.abs(got - want).max())
    report(request, f"max_abs_logit_diff_{gpu.device_kind}", diff)
    assert diff <= atol
