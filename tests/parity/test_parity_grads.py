"""Loss and gradients: `jax.grad` of jaxgpt vs `torch.autograd` of the book's and HF's models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_refs import book_model, hf_model, random_ids, report

import jaxgpt.interop as interop
from jaxgpt.config import GPTConfig
from jaxgpt.interop.common import flatten
from jaxgpt.losses import cross_entropy
from jaxgpt.model import GPT

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
RTOL = 1e-4  # per tensor: max |g_jax - g_torch| / max |g_torch|; fp32 observed ~1e-6


def _torch_loss_and_grads(model, ids: np.ndarray, targets: np.ndarray):  # noqa: ANN001, ANN202
    # The book's calc_loss_batch: cross-entropy over the flattened (batch * seq) positions.
    model.zero_grad()
    out = model(torch.as_tensor(ids))
    logits = getattr(out, "logits", out)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.as_tensor(targets).flatten()
    )
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return loss.item(), grads


def _jax_loss_and_grads(cfg: GPTConfig, params: dict, ids: np.ndarray, targets: np.ndarray):  # noqa: ANN202
    def loss_fn(p: dict) -> jax.Array:
        return cross_entropy(GPT(cfg).apply({"params": p}, jnp.asarray(ids)), jnp.asarray(targets))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return float(loss), grads


def _compare(want: dict, got: dict, request: pytest.FixtureRequest) -> None:
    want, got = flatten(want), flatten(got)
    assert set(want) == set(got)
    scale = max(float(np.abs(np.asarray(w)).max()) for w in want.values())
    worst = 0.0
    for k in sorted(want):
        w, g = np.asarray(want[k]), np.asarray(got[k])
        # The key bias's gradient is exactly zero in exact arithmetic (softmax ignores a
        # constant added to every score of a query), so both sides hold rounding noise only:
        # measure those against the largest gradient of the model instead.
        norm = float(np.abs(w).max())
        if norm < 1e-5 * scale:
            assert k.endswith("att/W_key/bias"), (k, norm)  # no other gradient vanishes
            assert float(np.abs(w - g).max()) <= 1e-6 * scale, k
            continue
        rel = float(np.abs(w - g).max()) / norm
        worst = max(worst, rel)
        assert rel <= RTOL, (k, rel)
    report(request, "max_rel_grad_diff", worst)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_gptmodel_grads(qkv_bias: bool, request: pytest.FixtureRequest) -> None:
    cfg = CFG.replace(qkv_bias=qkv_bias)
    model = book_model(cfg).train()  # drop_rate 0: train mode only enables autograd paths
    ids = random_ids(cfg, (2, 16), seed=1)
    targets = random_ids(cfg, (2, 16), seed=2)
    t_loss, t_grads = _torch_loss_and_grads(model, ids, targets)
    _, params = interop.from_book_state_dict(model.state_dict(), cfg)
    j_loss, j_grads = _jax_loss_and_grads(cfg, params, ids, targets)
    report(request, "abs_loss_diff", abs(j_loss - t_loss))
    assert abs(j_loss - t_loss) <= 1e-4 * abs(t_loss)
    # Torch gradients have the state dict's names and layouts: map them like weights.
    _, want = interop.from_book_state_dict(t_grads, cfg)
    _compare(want, j_grads, request)


def test_hf_tied_grads(request: pytest.FixtureRequest) -> None:
    # Tied head: both frameworks sum the embedding's and the head's gradient into one tensor.
    cfg = CFG.replace(qkv_bias=True, tie_embeddings=True)
    model = hf_model(cfg)
    ids = random_ids(cfg, (2, 16), seed=3)
    targets = random_ids(cfg, (2, 16), seed=4)
    t_loss, t_grads = _torch_loss_and_grads(model, ids, targets)
    hf_cfg = model.config.to_dict()
    _, params = interop.from_hf_state_dict(model.state_dict(), hf_config=hf_cfg)
    j_loss, j_grads = _jax_loss_and_grads(cfg, params, ids, targets)
    report(request, "abs_loss_diff", abs(j_loss - t_loss))
    assert abs(j_loss - t_loss) <= 1e-4 * abs(t_loss)
    _, want = interop.from_hf_state_dict(t_grads, hf_config=hf_cfg)
    _compare(want, j_grads, request)
