"""Freezing (`--trainable`): the pattern's selection, the trainable view in both layer layouts,
a train step that moves only that view and keeps optimizer state only for it, and its
checkpoint across layouts."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import checkpoint
from jaxgpt.config import TrainConfig
from jaxgpt.freeze import param_paths, select
from jaxgpt.model import flatten_params, init_params, stack_blocks, unstack_blocks
from jaxgpt.optim import adam_state, make_optimizer
from jaxgpt.step import init_train_state, make_train_step

BOOK_CHOICE = "(trf_blocks_1|final_norm|out_head)/.*"  # the last of 2 blocks, norm, head


def test_select_matches_whole_paths(small_vocab_config) -> None:
    t = select(BOOK_CHOICE, small_vocab_config)
    assert t.paths == (
        "final_norm/scale", "final_norm/shift", "out_head/kernel",
        *(p for p in param_paths(small_vocab_config) if p.startswith("trf_blocks_1/")),
    )  # fmt: skip
    assert len(t.paths) == 3 + 13  # a block: 3 QKV kernels, out_proj 2, ff 4, norms 4
    assert select(".*", small_vocab_config) is None  # everything trains: the plain optimizer
    assert select(None, small_vocab_config) is None
    with pytest.raises(ValueError, match="matches no parameter path"):
        select("out_head", small_vocab_config)  # fullmatch: the path is out_head/kernel
    with pytest.raises(ValueError, match="is not a regular expression"):
        select("(unclosed", small_vocab_config)


def _states(config, pattern: str, key: jax.Array):  # noqa: ANN202
    """(trainable, tx, fresh state) of `config` under `pattern`."""
    trainable = select(pattern, config)
    tx = make_optimizer(TrainConfig(lr=1e-2, decay_mask=True, grad_clip=1.0), 10)
    return trainable, tx, init_train_state(config, tx, key, trainable=trainable)


def test_view_and_merge_in_both_layouts(small_vocab_config, key) -> None:
    trainable = select(BOOK_CHOICE, small_vocab_config)
    params = init_params(small_vocab_config, key)
    stacked = stack_blocks(params)
    view, sview = trainable.view(params), trainable.view(stacked)
    assert sorted(flatten_params(view)) == sorted(trainable.paths)
    jax.tree.map(np.testing.assert_array_equal, view, sview)  # the same leaves, by name
    assert trainable.count(params) == trainable.count(stacked) > 0

    @jax.jit
    def bump(p: dict) -> dict:  # the trainable leaves + 1, merged back into stacked params
        return trainable.merge(p, jax.tree.map(lambda x: x + 1.0, trainable.view(p)))

    merged = bump(stacked)
    assert "trf_blocks" in merged and "trf_blocks_1" not in merged  # stays stacked
    out, old = flatten_params(unstack_blocks(merged)), flatten_params(params)
    for path, x in out.items():
        want = old[path] + 1.0 if path in trainable.paths else old[path]
        np.testing.assert_array_equal(x, want, err_msg=path)


# Unrolled: also every CLI run of tests/test_finetune.py; scanned is the harder layout.
@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_step_moves_only_the_trainable(small_vocab_config, key, scan: bool) -> None:
    config = small_vocab_config.replace(scan_layers=scan, drop_rate=0.0 if scan else 0.1)
    trainable, tx, state = _states(config, BOOK_CHOICE, key)
    before = flatten_params(unstack_blocks(jax.tree.map(np.asarray, state.params)))
    step = make_train_step(config, tx, grad_accum=1 if scan else 2, trainable=trainable)
    ids = jax.random.randint(jax.random.key(1), (4, 9), 0, config.vocab_size, jnp.int32)
    for _ in range(3):
        state, m = step(state, (ids[:, :-1], ids[:, 1:]))
    assert np.isfinite(float(m["loss"])) and int(state.step) == 3
    after = flatten_params(unstack_blocks(jax.tree.map(np.asarray, state.params)))
    for path in before:
        if path in trainable.paths:
            assert not np.array_equal(after[path], before[path]), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)  # bitwise
    # Optimizer state exists for the trainable params only, named as they are, either layout.
    mu = flatten_params(adam_state(state.opt_state).mu)
    assert sorted(mu) == sorted(trainable.paths)
    assert all(mu[p].shape == after[p].shape for p in mu)


def test_checkpoint_of_a_frozen_run_restores_in_either_layout(
    small_vocab_config, key, tmp_path: Path
) -> None:
    scanned = small_vocab_config.replace(scan_layers=True)
    trainable, tx, state = _states(scanned, "(trf_blocks_0|tok_emb)/.*", key)
    # Moments that differ from a fresh state's zeros, as after some steps.
    moments = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, state.opt_state)
    state = state.replace(opt_state=moments)
    with checkpoint.manager(tmp_path) as mngr:
        checkpoint.save(mngr, state, {})
    for config in (scanned, small_vocab_config):
        like = jax.eval_shape(
            lambda c=config: init_train_state(c, tx, jax.random.key(0), trainable=trainable)
        )
        with checkpoint.manager(tmp_path, read_only=True) as mngr:
            got, _ = checkpoint.restore(mngr, like)
        assert ("trf_blocks" in got.params) == config.scan_layers
        want = state.params if config.scan_layers else unstack_blocks(state.params)
        jax.tree.map(np.testing.assert_array_equal, got.params, want)
        jax.tree.map(np.testing.assert_array_equal, got.opt_state, state.opt_state)
