"""Ten steps of the book's AdamW in PyTorch and in jaxgpt from the same weights and batches."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_refs import book_model, random_ids, report

import jaxgpt.interop as interop
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.interop.common import flatten
from jaxgpt.optim import adam_state, make_optimizer
from jaxgpt.step import TrainState, make_train_step

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
# The book's ch. 5 optimizer: AdamW(lr=4e-4, weight_decay=0.1) on every parameter, torch's
# defaults betas (0.9, 0.999) and eps 1e-8, constant lr, no clipping.
TC = TrainConfig(lr=4e-4, weight_decay=0.1)
STEPS = 10
BATCHES = [
    (random_ids(CFG, (2, 16), seed=10 + i), random_ids(CFG, (2, 16), seed=100 + i))
    for i in range(STEPS)
]  # (inputs, targets) of shape (2, 16)
ATOL = 1e-4  # loss trajectories; fp32 round-off observed ~1e-6


def _torch_steps(model, opt, batches) -> list[float]:  # noqa: ANN001
    losses = []
    model.train()  # drop_rate 0.0: no dropout, as the issue asks
    for x, y in batches:
        opt.zero_grad()
        logits = model(torch.as_tensor(x))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(y).flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@functools.cache
def _train_step():  # noqa: ANN202
    """jaxgpt's jitted train step for CFG and TC, compiled once for both tests (~8 s here)."""
    return make_train_step(CFG, make_optimizer(TC, STEPS))


def _jax_steps(state: TrainState, batches) -> tuple[TrainState, list[float]]:  # noqa: ANN001
    train_step = _train_step()
    losses = []
    for x, y in batches:
        state, m = train_step(state, (jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))
        losses.append(float(m["loss"]))
    return state, losses


def _state(params: dict) -> TrainState:
    opt_state = make_optimizer(TC, STEPS).init(params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, key=jax.random.key(0))


def test_ten_adamw_steps(request: pytest.FixtureRequest) -> None:
    model = book_model(CFG)
    _, params = interop.from_book_state_dict(model.state_dict(), CFG)  # copies the init
    opt = torch.optim.AdamW(model.parameters(), lr=TC.lr, weight_decay=TC.weight_decay)
    t_losses = _torch_steps(model, opt, BATCHES)
    state, j_losses = _jax_steps(_state(params), BATCHES)
    diff = float(np.abs(np.array(t_losses) - np.array(j_losses)).max())
    report(request, "max_abs_loss_diff", diff)
    assert diff <= ATOL, (t_losses, j_losses)
    assert t_losses[-1] != t_losses[0]  # the weights did move
    _, want = interop.from_book_state_dict(model.state_dict(), CFG)
    want, got = flatten(want), flatten(state.params)
    assert want.keys() == got.keys()
    worst = max(
        float(np.abs(np.asarray(want[k]) - np.asarray(got[k])).max() / np.abs(want[k]).max())
        for k in want
    )
    report(request, "max_rel_param_diff", worst)
    assert worst <= 1e-4


def test_resume_torch_run_in_jaxgpt(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # 5 steps in PyTorch, the book's checkpoint file, then 5 more in each framework.
    model = book_model(CFG, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=TC.lr, weight_decay=TC.weight_decay)
    _torch_steps(model, opt, BATCHES[:5])
    ckpt = {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}
    torch.save(ckpt, tmp_path / "model_and_optimizer.pth")
    t_losses = _torch_steps(model, opt, BATCHES[5:])

    path = tmp_path / "model_and_optimizer.pth"
    moments = interop.load_book_optimizer(path, CFG)
    assert (moments.count, moments.lr, moments.betas, moments.eps) == (5, 4e-4, (0.9, 0.999), 1e-8)
    cfg, state = interop.book_train_state(path, TC, STEPS, CFG, key=jax.random.key(0))
    assert int(state.step) == 5
    state, j_losses = _jax_steps(state, BATCHES[5:])
    diff = float(np.abs(np.array(t_losses) - np.array(j_losses)).max())
    report(request, "max_abs_loss_diff", diff)
    assert diff <= ATOL
    # The moments went on from the imported ones: compare them after the 5 extra steps.
    final = interop.adamw_from_torch(opt.state_dict(), model.state_dict(), cfg)
    adam = adam_state(state.opt_state)
    assert int(adam.count) == final.count == 10
    for want, got in ((final.mu, adam.mu), (final.nu, adam.nu)):
        want, got = flatten(want), flatten(got)
        assert want.keys() == got.keys()
        for k in want:
            w, g = np.asarray(want[k]), np.asarray(got[k])
            assert np.abs(w - g).max() <= 1e-4 * np.abs(w).max() + 1e-12, k
