"""Round trips jaxgpt -> book -> jaxgpt and jaxgpt -> HF -> jaxgpt are bit exact."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt.interop as interop
from jaxgpt.config import GPTConfig
from jaxgpt.interop.common import expected_shapes, flatten, unflatten

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

BASE = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
VARIANTS = [(q, t) for q in (False, True) for t in (False, True)]  # (qkv_bias, tie)


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"qkv{int(v[0])}-tie{int(v[1])}")
def model(request: pytest.FixtureRequest) -> tuple[GPTConfig, dict]:
    qkv_bias, tie = request.param
    cfg = BASE.replace(qkv_bias=qkv_bias, tie_embeddings=tie, init="gpt2", drop_rate=0.0)
    # The model's param tree (abstract init, no compile) with every leaf random: a real init
    # leaves biases at 0 and LayerNorms at 1/0, which would hide swapped names.
    rng = np.random.default_rng(7)
    shapes = expected_shapes(cfg)
    params = unflatten(
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    )
    return cfg, params


def _bit_exact(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_book_round_trip(model: tuple[GPTConfig, dict], tmp_path: Path, suffix: str) -> None:
    cfg, params = model
    path = interop.export_book(cfg, params, tmp_path / f"model{suffix}")
    # .safetensors carries the config; a .pth, like the book's files, needs n_heads.
    got_cfg, got = interop.load(path, None if suffix == ".safetensors" else {"n_heads": 4})
    _bit_exact(params, got)
    assert got_cfg.tie_embeddings == cfg.tie_embeddings and got_cfg.qkv_bias == cfg.qkv_bias
    if suffix == ".safetensors":
        assert got_cfg == cfg


def test_hf_round_trip(model: tuple[GPTConfig, dict], tmp_path: Path) -> None:
    cfg, params = model
    interop.export_hf(cfg, params, tmp_path / "hf")
    got_cfg, got = interop.load(tmp_path / "hf")
    _bit_exact(params, got)
    assert got_cfg == cfg
