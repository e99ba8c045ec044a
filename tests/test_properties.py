"""Property-based tests (hypothesis): data windows and splits against plain-Python references,
tokenizer round trips, sampling-argument validation, checkpoint round trips of small pytrees."""

from __future__ import annotations

import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgpt import checkpoint, data, tokenizer
from jaxgpt.config import GPTConfig
from jaxgpt.sampling import check_generate_args
from jaxgpt.step import TrainState

FAST = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------- data


def _reference_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list, list]]:
    """The book's GPTDatasetV1 loop, verbatim in plain Python."""
    out = []
    for i in range(0, len(ids) - max_length, stride):
        out.append((ids[i : i + max_length], ids[i + 1 : i + max_length + 1]))
    return out


def _reference_batches(windows: list, order: list[int], batch_size: int, drop_last: bool) -> list:
    """torch DataLoader batching of `windows` taken in `order`."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [([windows[j][0] for j in b], [windows[j][1] for j in b]) for b in batches]


@FAST
@given(
    n=st.integers(0, 200),
    max_length=st.integers(1, 24),
    stride=st.integers(1, 24),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 3),
)
def test_batches_equal_the_books_loader(
    n, max_length, stride, batch_size, drop_last, shuffle, seed, epoch
) -> None:
    ids = list(np.random.default_rng(seed).integers(0, 50257, n))
    windows = _reference_windows(ids, max_length, stride)
    order = list(data.epoch_order(len(windows), seed=seed, epoch=epoch, shuffle=shuffle))
    assert sorted(order) == list(range(len(windows)))  # a permutation (identity unshuffled)
    if not shuffle:
        assert order == list(range(len(windows)))
    want = _reference_batches(windows, order, batch_size, drop_last)
    pos = data.DataPosition(epoch=epoch, seed=seed)
    got = list(
        data.batches(
            np.asarray(ids, np.int64), batch_size, max_length, stride,
            seed=seed, shuffle=shuffle, drop_last=drop_last, position=pos,
        )
    )  # fmt: skip
    assert len(got) == len(want) == data.num_batches(len(windows), batch_size, drop_last)
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert x.dtype == y.dtype == np.int32
        assert x.tolist() == wx and y.tolist() == wy
    assert (pos.epoch, pos.batch) == (epoch + 1, 0)


@FAST
@given(
    n=st.integers(0, 120),
    max_length=st.integers(1, 10),
    stride=st.integers(1, 10),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 1000),
    data_=st.data(),
)
def test_resuming_at_any_position_yields_the_rest(n, max_length, stride, batch_size, seed, data_):
    ids = np.arange(n)
    full = list(data.batches(ids, batch_size, max_length, stride, seed=seed))
    k = data_.draw(st.integers(0, len(full)))
    pos = data.DataPosition(batch=k, seed=seed)
    rest = list(data.batches(ids, batch_size, max_length, stride, seed=seed, position=pos))
    assert len(rest) == len(full) - k
    for (x, y), (fx, fy) in zip(rest, full[k:], strict=True):
        np.testing.assert_array_equal(x, fx)
        np.testing.assert_array_equal(y, fy)


@FAST
@given(text=st.text(max_size=300), ratio=st.floats(0.01, 0.99))
def test_split_text_is_the_books_character_split(text: str, ratio: float) -> None:
    train, val = data.split_text(text, ratio)
    assert train + val == text and len(train) == int(ratio * len(text))


@FAST
@given(
    n_train=st.integers(0, 80),
    n_val=st.integers(0, 40),
    max_length=st.integers(1, 12),
    stride=st.integers(1, 12),
    batch_size=st.integers(1, 6),
)
def test_check_splits_raises_exactly_when_a_loader_is_empty(
    n_train, n_val, max_length, stride, batch_size
) -> None:
    splits = data.Splits(np.zeros(n_train, np.int32), np.zeros(n_val, np.int32))
    n_tw = len(_reference_windows([0] * n_train, max_length, stride))
    n_vw = len(_reference_windows([0] * n_val, max_length, stride))
    ok = n_tw >= batch_size and n_vw > 0
    if ok:
        data.check_splits(splits, max_length, batch_size, stride)
    else:
        with pytest.raises(ValueError, match="Not enough tokens"):
            data.check_splits(splits, max_length, batch_size, stride)


# ----------------------------------------------------------------------------- tokenizer


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_unicode(text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_array(text).tolist() == ids


# ----------------------------------------------------------------------------- sampling args

V = 97
_ints = st.one_of(st.none(), st.integers(-3, V + 3))
_floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))


def _valid(max_new, temperature, top_k, top_p, eos, beams, penalty, has_key, prompts) -> bool:
    """Which `generate` arguments are legal, written independently of the checker."""
    return (
        isinstance(max_new, int)
        and max_new >= 0
        and math.isfinite(temperature)
        and temperature >= 0
        and (top_k is None or 1 <= top_k <= V)
        and (top_p is None or 0 < top_p <= 1)
        and (eos is None or 0 <= eos < V)
        and beams >= 1
        and math.isfinite(penalty)
        and not (beams > 1 and (temperature > 0 or top_k is not None or top_p is not None))
        and not (temperature > 0 and not has_key)
        and len(prompts) > 0
        and all(len(p) > 0 and all(0 <= t < V for t in p) for p in prompts)
    )


@settings(max_examples=300, deadline=None)
@given(
    max_new=st.integers(-2, 5),
    temperature=st.one_of(st.floats(-1, 3), st.sampled_from([0.0, math.nan, math.inf])),
    top_k=_ints,
    top_p=st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(math.nan)),
    eos=_ints,
    beams=st.integers(-1, 3),
    penalty=st.one_of(st.floats(-2, 2), st.just(math.nan)),
    has_key=st.booleans(),
    prompts=st.lists(st.lists(st.integers(-2, V + 2), max_size=4), max_size=3),
)
def test_sampling_arguments_are_refused_exactly_when_illegal(
    max_new, temperature, top_k, top_p, eos, beams, penalty, has_key, prompts
) -> None:
    config = GPTConfig(vocab_size=V, context_length=8, emb_dim=8, n_heads=2, n_layers=1)
    key = jax.random.key(0) if has_key else None
    args = (max_new, temperature, top_k, top_p, eos, beams, key, penalty)
    valid = _valid(max_new, temperature, top_k, top_p, eos, beams, penalty, has_key, prompts)
    if valid:
        check_generate_args(config, prompts, *args[:6], key, penalty)
    else:
        with pytest.raises(ValueError):  # never another exception type
            check_generate_args(config, prompts, *args[:6], key, penalty)


# ----------------------------------------------------------------------------- checkpoints

_DTYPES = [jnp.float32, jnp.int32, jnp.bfloat16, jnp.uint32]


@st.composite
def _arrays(draw: st.DrawFn) -> jax.Array:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))  # Orbax: no zero-size arrays
    seed = draw(st.integers(0, 2**31 - 1))
    bits = np.random.default_rng(seed).integers(0, 2**32, size=shape, dtype=np.uint64)
    raw = bits.astype(np.uint32)  # any bit pattern, nan and inf payloads included
    if jnp.dtype(dtype).itemsize == 2:
        return jax.lax.bitcast_convert_type(jnp.asarray(raw.astype(np.uint16)), dtype)
    return jax.lax.bitcast_convert_type(jnp.asarray(raw), dtype)


_names = st.text("abcdefgh_", min_size=1, max_size=6)
_trees = st.recursive(
    _arrays(), lambda kids: st.dictionaries(_names, kids, min_size=1, max_size=3), max_leaves=5
)


def _bits(x: jax.Array) -> np.ndarray:
    x = jnp.asarray(x)
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")))


# Each example is a real Orbax save and restore (and a compile of the fingerprint): keep few.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=st.dictionaries(_names, _trees, min_size=1, max_size=3),
    opt=st.lists(_arrays(), min_size=0, max_size=3),
    step=st.integers(0, 2**31 - 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_checkpoint_round_trips_any_small_pytree_bit_for_bit(params, opt, step, seed) -> None:
    state = TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state=tuple(opt),
        key=jax.random.key(seed),
    )  # fmt: skip
    meta = {"position": {"epoch": 1, "batch": 2, "seed": 3}}
    with tempfile.TemporaryDirectory() as d:
        with checkpoint.manager(d) as mngr:
            checkpoint.save(mngr, state, meta)
        with checkpoint.manager(d) as mngr:
            got, got_meta = checkpoint.restore(mngr, jax.eval_shape(lambda: state))
    assert got_meta == meta and int(got.step) == step
    assert jax.tree.structure(got) == jax.tree.structure(state)
    got_leaves = jax.tree.leaves((got.step, got.params, got.opt_state))
    want_leaves = jax.tree.leaves((state.step, state.params, state.opt_state))
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(_bits(a), _bits(b))  # nan payloads included
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(state.key))


@settings(max_examples=40, deadline=None)
@given(tree=_trees, data_=st.data())
def test_fingerprint_changes_with_any_single_bit(tree, data_) -> None:
    leaves, treedef = jax.tree.flatten(tree)
    i = data_.draw(st.integers(0, len(leaves) - 1))
    bits = _bits(leaves[i]).copy()
    j = data_.draw(st.integers(0, bits.size - 1))
    b = data_.draw(st.integers(0, bits.dtype.itemsize * 8 - 1))
    bits.flat[j] ^= bits.dtype.type(1 << b)
    flipped = list(leaves)
    flipped[i] = jax.lax.bitcast_convert_type(jnp.asarray(bits), leaves[i].dtype)
    assert checkpoint.fingerprint(jax.tree.unflatten(treedef, flipped)) != checkpoint.fingerprint(
        tree
    )
