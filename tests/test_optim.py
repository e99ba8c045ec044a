"""Optimizer: TrainConfig validation, schedule arithmetic, clipping, AdamW == torch.optim.AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import TrainConfig
from jaxgpt.model import init_params
from jaxgpt.optim import (
    adam_state,
    decay_mask,
    learning_rate,
    make_optimizer,
    make_schedule,
    with_adam_state,
)


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -1e-3},
        {"lr": 0.0},
        {"batch_size": 0},
        {"epochs": -1},
        {"max_steps": 0},
        {"stride": 0},
        {"min_lr": 1.0},
        {"grad_clip": 0.0},
        {"warmup_steps": -1},
        {"weight_decay": -0.1},
        {"b2": 1.0},
        {"train_ratio": 1.0},
        {"eval_freq": 0},
        {"keep": 0},
        {"seed": -1},
    ],
)
def test_train_config_rejects_bad_values(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**bad)


def test_train_config_round_trips_and_rejects_unknown_keys() -> None:
    tc = TrainConfig(lr=4e-4, batch_size=2, min_lr=None, grad_clip=1.0)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_schedule_values_from_arithmetic() -> None:
    lr, lo, warm, total = 1e-3, 1e-4, 10, 110
    cos = make_schedule(TrainConfig(lr=lr, min_lr=lo, warmup_steps=warm), total)
    # Linear warmup from 0: step s < warm gives lr * s / warm.
    assert float(cos(0)) == 0.0
    assert math.isclose(float(cos(5)), 5e-4, rel_tol=1e-6)
    assert math.isclose(float(cos(10)), lr, rel_tol=1e-6)
    # Halfway through the 100 decay steps: lo + (lr - lo) * (1 + cos(pi / 2)) / 2.
    assert math.isclose(float(cos(60)), lo + (lr - lo) * 0.5, rel_tol=1e-6)
    assert math.isclose(float(cos(110)), lo, rel_tol=1e-6)
    assert math.isclose(float(cos(500)), lo, rel_tol=1e-6)
    const = make_schedule(TrainConfig(lr=lr), total)
    assert [float(const(s)) for s in (0, 7, 1000)] == pytest.approx([lr] * 3, rel=1e-7)
    warm_const = make_schedule(TrainConfig(lr=lr, warmup_steps=4), total)
    assert [float(warm_const(s)) for s in (0, 1, 4, 50)] == pytest.approx([0, 2.5e-4, lr, lr])


def test_learning_rate_in_state_is_the_one_used() -> None:
    tc = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=2)
    tx = make_optimizer(tc, total_steps=4)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    seen = []
    for _ in range(4):
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
        seen.append(float(learning_rate(state)))
    # steps 0, 1 warm up (0, lr/2); steps 2, 3 decay over 2 steps: lr, lr * (1 + cos(pi/2)) / 2
    assert seen == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_clipping_rescales_to_max_norm_only_above_it() -> None:
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    big = {"a": jnp.array([3.0, 0.0, 0.0]), "b": jnp.array([[0.0, 4.0], [0.0, 0.0]])}  # norm 5
    clipped = make_optimizer(TrainConfig(grad_clip=2.0, weight_decay=0.0), 10)
    plain = make_optimizer(TrainConfig(weight_decay=0.0), 10)
    clip_state = clipped.init(params)
    # The clip stage alone: global norm after clipping equals max_norm.
    first, _ = optax.clip_by_global_norm(2.0).update(big, clip_state[0])
    assert math.isclose(float(optax.global_norm(first)), 2.0, rel_tol=1e-6)
    # The whole chain equals AdamW fed the gradient scaled by 2/5 ...
    u1, _ = clipped.update(big, clip_state, params)
    u2, _ = plain.update(jax.tree.map(lambda g: g * 0.4, big), plain.init(params), params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u1, u2)
    # ... and leaves a gradient below max_norm untouched.
    small = jax.tree.map(lambda g: g * 0.1, big)
    u1, _ = clipped.update(small, clipped.init(params), params)
    u2, _ = plain.update(small, plain.init(params), params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), u1, u2)


def test_decay_mask_spares_biases_norms_embeddings(tiny_config) -> None:
    params = init_params(tiny_config, jax.random.key(0))
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): m
        for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    decayed = sorted(k for k, m in flat.items() if m)
    assert decayed and all(k.endswith("kernel") for k in decayed)
    assert not flat["tok_emb/embedding"] and not flat["pos_emb/embedding"]
    assert not flat["final_norm/scale"] and not flat["trf_blocks_0/att/out_proj/bias"]
    assert flat["out_head/kernel"]


def _torch_adamw_steps(w0, b0, grads, *, lr, wd, mask_bias):
    import torch

    w = torch.nn.Parameter(torch.tensor(w0))
    b = torch.nn.Parameter(torch.tensor(b0))
    groups = [{"params": [w]}, {"params": [b], "weight_decay": 0.0 if mask_bias else wd}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)  # the book's call: eps, betas default
    for gw, gb in grads:
        w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
    return w.detach().numpy(), b.detach().numpy(), opt


@pytest.mark.torch
@pytest.mark.parametrize("mask", [False, True])
def test_adamw_steps_equal_torch(mask: bool) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    b0 = rng.normal(size=3).astype(np.float32)
    grads = [
        (rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
        for _ in range(3)
    ]
    tw, tb, _ = _torch_adamw_steps(w0, b0, grads, lr=4e-4, wd=0.1, mask_bias=mask)
    tx = make_optimizer(TrainConfig(lr=4e-4, weight_decay=0.1, decay_mask=mask), 10)
    params = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    state = tx.init(params)
    for gw, gb in grads:
        updates, state = tx.update({"kernel": gw, "bias": gb}, state, params)
        params = optax.apply_updates(params, updates)
    # fp32: torch divides sqrt(v) by sqrt(1 - b2^t), optax takes sqrt(v / (1 - b2^t));
    # rounding differs in the last bits of a 1e-4-sized update.
    np.testing.assert_allclose(params["kernel"], tw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(params["bias"], tb, rtol=1e-6, atol=1e-7)


@pytest.mark.torch
def test_with_adam_state_continues_a_torch_run() -> None:
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    b0 = rng.normal(size=3).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)), rng.normal(size=3)) for _ in range(4)]
    grads = [(gw.astype(np.float32), gb.astype(np.float32)) for gw, gb in grads]
    tw3, tb3, opt = _torch_adamw_steps(w0, b0, grads[:3], lr=1e-3, wd=0.1, mask_bias=False)
    tw4, tb4, _ = _torch_adamw_steps(w0, b0, grads, lr=1e-3, wd=0.1, mask_bias=False)
    sw, sb = (opt.state[p] for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"])
    tx = make_optimizer(TrainConfig(lr=1e-3, weight_decay=0.1), 10)
    params = {"kernel": jnp.asarray(tw3), "bias": jnp.asarray(tb3)}
    state = with_adam_state(
        tx.init(params),
        count=int(sw["step"]),
        mu={"kernel": sw["exp_avg"].numpy(), "bias": sb["exp_avg"].numpy()},
        nu={"kernel": sw["exp_avg_sq"].numpy(), "bias": sb["exp_avg_sq"].numpy()},
    )
    assert int(adam_state(state).count) == 3
    updates, _ = tx.update({"kernel": grads[3][0], "bias": grads[3][1]}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["kernel"], tw4, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(params["bias"], tb4, rtol=1e-6, atol=1e-7)
