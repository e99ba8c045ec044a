"""torch AdamW state (the book's `optimizer_state_dict`) -> optax AdamW moments (mu, nu, count).

torch numbers its params in `model.parameters()` order, which is the model state dict's
order without buffers. `exp_avg`/`exp_avg_sq` become optax's `mu`/`nu` (kernels transposed
like the weights) and `step` becomes `count`; `jaxgpt.optim.with_adam_state` puts them into
a train state so a run started in PyTorch continues in jaxgpt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.interop.book import book_key, from_book_state_dict, read_book_file
from jaxgpt.interop.common import ConfigLike, expected_shapes, unflatten
from jaxgpt.interop.tensors import as_numpy
from jaxgpt.model import Params, to_layout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdamWMoments:
    """AdamW state in optax's terms plus the torch hyperparameters it was run with."""

    count: int  # torch `step`: number of updates taken
    mu: Params  # first moments, same tree as params
    nu: Params  # second moments, same tree as params
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def _param_keys(model_state_dict: Mapping[str, Any]) -> list[str]:
    """Model state-dict keys in parameter order (buffers such as `att.mask` removed)."""
    return [k for k in model_state_dict if not k.endswith(".att.mask")]


def adamw_from_torch(
    optimizer_state_dict: Mapping[str, Any],
    model_state_dict: Mapping[str, Any],
    config: GPTConfig,
) -> AdamWMoments:
    """Map a torch AdamW `state_dict()` of the book's GPTModel onto jaxgpt param paths.

    Args:
      optimizer_state_dict: `torch.optim.AdamW(...).state_dict()`: one param group.
      model_state_dict: the matching `model.state_dict()` (its key order numbers the params).
      config: the jaxgpt config of the loaded model; must be untied (torch trains the
        head separately from the embedding).

    Returns:
      AdamWMoments whose mu/nu trees match the params of `config`.
    """
    if config.tie_embeddings:
        raise ValueError("AdamW state of the book's model needs tie_embeddings=False")
    groups = optimizer_state_dict.get("param_groups", [])
    if len(groups) != 1:
        raise ValueError(f"expected one AdamW param group, got {len(groups)}")
    group = groups[0]
    if group.get("amsgrad") or not group.get("decoupled_weight_decay", True):
        raise ValueError("only torch.optim.AdamW (amsgrad=False) state can be imported")
    keys = _param_keys(model_state_dict)
    if sorted(group["params"]) != list(range(len(keys))):
        raise ValueError(
            f"optimizer holds {len(group['params'])} params; the model has {len(keys)}"
        )
    want = expected_shapes(config)
    by_key = {book_key(path)[0]: path for path in want}
    state = optimizer_state_dict.get("state", {})
    mu, nu, steps = {}, {}, set()
    for index, key in enumerate(keys):
        path = by_key.get(key)
        if path is None:
            raise ValueError(f"optimizer param {index} ({key!r}) has no jaxgpt counterpart")
        transpose = book_key(path)[1]
        s = state.get(index)
        if s is None:  # never updated: zero moments, as torch would start them
            m = v = np.zeros(want[path], np.float32)
        else:
            m, v = as_numpy(s["exp_avg"]), as_numpy(s["exp_avg_sq"])
            m, v = (m.T, v.T) if transpose else (m, v)
            steps.add(int(as_numpy(s["step"])))
        mu[path], nu[path] = jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32)
    if len(steps) > 1:
        raise ValueError(f"params were updated different numbers of times: {sorted(steps)}")
    return AdamWMoments(
        count=steps.pop() if steps else 0,
        mu=to_layout(unflatten(mu), config),
        nu=to_layout(unflatten(nu), config),
        lr=float(group["lr"]),
        betas=tuple(float(b) for b in group["betas"]),  # type: ignore[arg-type]
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
    )


def _read(path: str | Path, config: ConfigLike) -> tuple[GPTConfig, Params, AdamWMoments]:
    sd, opt, _ = read_book_file(path)
    if opt is None:
        raise ValueError(f"{path} holds no optimizer_state_dict; save the book's full checkpoint")
    cfg, params = from_book_state_dict(sd, config, source=str(path), has_optimizer=True)
    return cfg, params, adamw_from_torch(opt, sd, cfg)


def load_book_optimizer(path: str | Path, config: ConfigLike = None) -> AdamWMoments:
    """AdamW moments from the book's {"model_state_dict", "optimizer_state_dict"} file."""
    return _read(path, config)[2]


def book_train_state(
    path: str | Path,
    train_config: TrainConfig,
    total_steps: int,
    config: ConfigLike = None,
    *,
    key: jax.Array,
) -> tuple[GPTConfig, Any]:
    """Continue a PyTorch run of the book in jaxgpt: a `jaxgpt.step.TrainState` from the
    book's {"model_state_dict", "optimizer_state_dict"} checkpoint.

    Args:
      path: the book's `torch.save({"model_state_dict": ..., "optimizer_state_dict": ...})`.
      train_config: optimizer settings for `jaxgpt.optim.make_optimizer`; lr, betas, eps and
        weight decay should be those of the torch run (a mismatch is logged).
      total_steps: as for `make_optimizer` (the cosine schedule's length).
      config: n_heads etc. where the file does not fix them (see `jaxgpt.load`).
      key: dropout key of the new state.

    Returns:
      (config, TrainState) with `step` = torch's step count and the AdamW moments in place.
    """
    from jaxgpt.optim import make_optimizer, with_adam_state
    from jaxgpt.step import TrainState

    cfg, params, m = _read(path, config)
    tc = train_config
    ours = (tc.lr, (tc.b1, tc.b2), tc.eps, tc.weight_decay)
    theirs = (m.lr, m.betas, m.eps, m.weight_decay)
    if ours != theirs:
        logger.warning(
            "torch AdamW ran with (lr, betas, eps, wd)=%s; continuing with %s", theirs, ours
        )
    opt_state = make_optimizer(tc, total_steps).init(params)
    opt_state = with_adam_state(opt_state, count=m.count, mu=m.mu, nu=m.nu)
    step = jnp.asarray(m.count, jnp.int32)
    return cfg, TrainState(step=step, params=params, opt_state=opt_state, key=key)
