"""Checkpoints: TrainState round trip, last K kept, params files, `load` of both kinds."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import checkpoint
from jaxgpt.config import TrainConfig
from jaxgpt.optim import make_optimizer
from jaxgpt.step import init_train_state, make_train_step


def _equal(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def trained(small_vocab_config):
    tc = TrainConfig(grad_clip=1.0, decay_mask=True, warmup_steps=2, min_lr=1e-4)
    tx = make_optimizer(tc, 10)
    state = init_train_state(small_vocab_config, tx, jax.random.key(3))
    ids = jax.random.randint(jax.random.key(4), (2, 9), 0, small_vocab_config.vocab_size)
    state, _ = make_train_step(small_vocab_config, tx)(state, (ids[:, :-1], ids[:, 1:]))
    return tc, tx, state


def test_train_state_round_trip(tmp_path: Path, small_vocab_config, trained) -> None:
    tc, tx, state = trained
    checkpoint.save_run_config(tmp_path, small_vocab_config, tc)
    meta = {"position": {"epoch": 1, "batch": 2, "seed": 5}, "tokens_seen": 36}
    with checkpoint.manager(tmp_path) as mngr:
        checkpoint.save(mngr, state, meta)
    like = jax.eval_shape(lambda: init_train_state(small_vocab_config, tx, jax.random.key(0)))
    with checkpoint.manager(tmp_path) as mngr:
        got, got_meta = checkpoint.restore(mngr, like)
    assert got_meta == meta and int(got.step) == 1
    _equal(got.params, state.params)
    _equal(got.opt_state, state.opt_state)
    assert jax.tree.structure(got.opt_state) == jax.tree.structure(state.opt_state)
    # The typed PRNG key comes back typed and equal.
    assert jax.dtypes.issubdtype(got.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(state.key))
    assert checkpoint.load_run_config(tmp_path) == (small_vocab_config, tc)


def test_keeps_last_k_and_load_run_reads_newest(tmp_path: Path, small_vocab_config, trained):
    tc, _, state = trained
    checkpoint.save_run_config(tmp_path, small_vocab_config, tc)
    with checkpoint.manager(tmp_path, keep=2) as mngr:
        for step in (1, 2, 3):
            bumped = jax.tree.map(lambda p, s=step: p + s, state.params)
            checkpoint.save(mngr, state.replace(step=state.step * 0 + step, params=bumped), {})
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 3]
    assert checkpoint.latest_step(tmp_path) == 3
    config, params = checkpoint.load(tmp_path)
    assert config == small_vocab_config
    _equal(params, jax.tree.map(lambda p: p + 3, state.params))


def test_params_file_round_trip(tmp_path: Path, small_vocab_config, trained) -> None:
    _, _, state = trained
    path = tmp_path / "model.npz"
    checkpoint.save_params(path, small_vocab_config, state.params)
    with np.load(path) as f:  # plain NumPy, "/"-joined names
        assert "trf_blocks_0/att/W_query/kernel" in f.files
    config, params = checkpoint.load(path)
    assert config == small_vocab_config
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    _equal(params, state.params)


def test_load_rejects_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither"):
        checkpoint.load(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="neither"):
        checkpoint.load(tmp_path)  # a folder without config.json
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a jaxgpt params file"):
        checkpoint.load(tmp_path / "other.npz")


def test_fingerprint_per_leaf_equals_one_program() -> None:
    """The per-leaf fingerprint (one device) and the one-program form (sharded states, and
    every checkpoint written before the split) give the same value, so old checkpoints verify."""
    from jaxgpt.checkpoint import _all_leaf_sums, fingerprint

    rng = np.random.default_rng(0)
    tree = {
        "w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        "n": jnp.asarray(rng.integers(-9, 9, size=(7,)), jnp.int32),
        "flag": jnp.asarray([True, False]),
        "s": jnp.float32(2.5),
    }
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    whole = "".join(f"{int(v):08x}" for v in np.asarray(_all_leaf_sums(leaves)))
    assert fingerprint(tree) == whole
    tree["w"] = tree["w"].at[1, 2].add(1e-3)  # one changed value changes it
    assert fingerprint(tree) != whole
