"""The optax chain: global-norm clipping, AdamW (+ decay mask), warmup + constant/cosine schedule.

The chain always has the same structure, so optimizer states are interchangeable:

    opt_state[0]                          clipping (an empty state; identity when no clip)
    opt_state[1]                          InjectStatefulHyperparamsState(count, hyperparams,
                                          hyperparams_states, inner_state)
    opt_state[1].hyperparams["learning_rate"]         the lr of the last update
    opt_state[1].hyperparams_states["learning_rate"]  WrappedScheduleState(count): schedule step
    opt_state[1].inner_state[0]           ScaleByAdamState(count, mu, nu)

`mu`/`nu` mirror the params tree; they are torch AdamW's `exp_avg`/`exp_avg_sq`, and
`count` is its `step` (see `adam_state` / `with_adam_state`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import TrainConfig

Params = Any


def make_schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup from 0 over `warmup_steps`, then constant `lr`
    (min_lr None, the book) or cosine decay from `lr` to `min_lr` at `total_steps`."""
    if tc.min_lr is None:
        if tc.warmup_steps == 0:
            return optax.constant_schedule(tc.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, tc.lr, tc.warmup_steps), optax.constant_schedule(tc.lr)],
            [tc.warmup_steps],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=max(total_steps, tc.warmup_steps + 1),
        end_value=tc.min_lr,
    )


def decay_mask(params: Params) -> Params:
    """True for the weights to decay: Dense kernels only (not biases, norms or embeddings)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(tc: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (or identity) -> AdamW with the schedule injected as a hyperparam.

    With the defaults (no clip, no mask, constant lr) this is the book's
    `torch.optim.AdamW(lr, weight_decay)`: betas (0.9, 0.999), eps 1e-8, decoupled decay
    `lr * wd * param` on every parameter.
    """
    clip = optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity()
    # `mask` is a function of params, not a schedule: keep it out of the injected hyperparams.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=make_schedule(tc, total_steps),
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        mask=decay_mask if tc.decay_mask else None,
    )
    return optax.chain(clip, adamw)


def learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate the last update used (float32 scalar)."""
    return jnp.asarray(opt_state[1].hyperparams["learning_rate"], jnp.float32)


def adam_state(opt_state: optax.OptState) -> optax.ScaleByAdamState:
    """The AdamW moments: `count` (torch `step`), `mu` (`exp_avg`), `nu` (`exp_avg_sq`)."""
    return opt_state[1].inner_state[0]


def with_adam_state(
    opt_state: optax.OptState, *, count: jax.Array, mu: Params, nu: Params
) -> optax.OptState:
    """`opt_state` with its AdamW moments and step replaced (e.g. from a torch optimizer).

    The schedule's own step counter is set to `count` too, so the lr continues in place.
    """
    inject = opt_state[1]

    # A fresh array per leaf: the train step donates its state, and one buffer can be
    # donated only once.
    def fresh() -> jax.Array:
        return jnp.array(count, jnp.int32)

    adam = inject.inner_state[0]._replace(count=fresh(), mu=mu, nu=nu)
    sched = {k: s._replace(count=fresh()) for k, s in inject.hyperparams_states.items()}
    inject = inject._replace(
        count=fresh(), hyperparams_states=sched, inner_state=(adam, *inject.inner_state[1:])
    )
    return (opt_state[0], inject, *opt_state[2:])
