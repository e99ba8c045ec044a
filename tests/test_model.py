"""GPT module: param tree, shapes, causality, jit, dropout, init, cached decoding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import get_preset
from jaxgpt.model import GPT, count_params, init_cache, init_params


def _fwd(cfg):
    return jax.jit(lambda p, ids: GPT(cfg).apply({"params": p}, ids))


def _ids(cfg, b, s, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, s)), jnp.int32)


def test_param_tree_is_pinned(small_vocab_config):
    cfg = small_vocab_config  # emb 32, 2 layers, vocab 97, context 16, no qkv bias
    shapes = jax.tree_util.tree_map(lambda x: x.shape, init_params(cfg, jax.random.key(0)))
    dense = lambda i, o, bias=True: {"kernel": (i, o), **({"bias": (o,)} if bias else {})}  # noqa: E731
    norm = {"scale": (32,), "shift": (32,)}
    block = {
        "att": {
            "W_query": dense(32, 32, False),
            "W_key": dense(32, 32, False),
            "W_value": dense(32, 32, False),
            "out_proj": dense(32, 32),
        },
        "ff": {"layers_0": dense(32, 128), "layers_2": dense(128, 32)},
        "norm1": norm,
        "norm2": norm,
    }
    assert shapes == {
        "tok_emb": {"embedding": (97, 32)},
        "pos_emb": {"embedding": (16, 32)},
        "trf_blocks_0": block,
        "trf_blocks_1": block,
        "final_norm": norm,
        "out_head": {"kernel": (32, 97)},
    }


def _expected_count(v, c, e, layers, qkv_bias, tied):
    per_block = 3 * e * e + (3 * e if qkv_bias else 0) + e * e + e  # attention
    per_block += e * 4 * e + 4 * e + 4 * e * e + e  # feed-forward
    per_block += 4 * e  # two LayerNorms
    return v * e + c * e + layers * per_block + 2 * e + (0 if tied else e * v)


@pytest.mark.parametrize("name", ["book-124m", "gpt2", "gpt2-medium"])
def test_param_counts(name):
    cfg = get_preset(name)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    n = count_params(shapes["params"])
    args = (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers)
    assert n == _expected_count(*args, cfg.qkv_bias, cfg.tie_embeddings)
    # Published figures: the book's 124M with context 256 is 163,009,536 - 768 * 768
    # (its 1024-context count), and OpenAI's gpt2 is 124,439,808.
    assert n == {"book-124m": 162_419_712, "gpt2": 124_439_808, "gpt2-medium": 354_823_168}[name]


def test_logits_shape_dtype_finite(small_vocab_config, key):
    cfg = small_vocab_config
    params = init_params(cfg, key)
    logits = _fwd(cfg)(params, _ids(cfg, 3, 16))
    assert logits.shape == (3, 16, 97) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


def test_changing_a_later_token_never_changes_earlier_logits(small_vocab_config, key):
    cfg = small_vocab_config
    params = init_params(cfg, key)
    ids = _ids(cfg, 1, 12)
    fwd = _fwd(cfg)
    base = fwd(params, ids)
    for t in range(12):
        changed = ids.at[0, t].set((ids[0, t] + 1) % cfg.vocab_size)
        out = fwd(params, changed)
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


def test_causality_via_gradients(small_vocab_config, key):
    cfg = small_vocab_config
    params = init_params(cfg, key)
    ids = _ids(cfg, 1, 8)
    model = GPT(cfg)

    @jax.jit
    def grad_at(emb_table, t):
        def out_at(emb_table):
            p = {**params, "tok_emb": {"embedding": emb_table}}
            return jnp.take(model.apply({"params": p}, ids)[0], t, axis=0).sum()

        return jax.grad(out_at)(emb_table)

    table = params["tok_emb"]["embedding"]
    for t in (0, 3, 7):
        g = grad_at(table, t)  # (vocab, emb): rows of tokens at positions <= t only
        later = {int(i) for i in ids[0, t + 1 :]} - {int(i) for i in ids[0, : t + 1]}
        for tok in later:
            assert float(jnp.abs(g[tok]).max()) == 0.0


def test_jit_equals_eager(small_vocab_config, key):
    cfg = small_vocab_config
    params = init_params(cfg, key)
    ids = _ids(cfg, 2, 10)
    model = GPT(cfg)
    eager = model.apply({"params": params}, ids)
    jitted = jax.jit(model.apply)({"params": params}, ids)
    # Same ops, possibly fused differently by XLA: fp32 rounding only.
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_dropout_needs_a_key_and_uses_it(key):
    cfg = get_preset("tiny").replace(vocab_size=97, drop_rate=0.5)
    params = init_params(cfg, key)
    ids = _ids(cfg, 2, 8)
    eval_out = _fwd(cfg)(params, ids)
    train = jax.jit(
        lambda k: GPT(cfg).apply({"params": params}, ids, deterministic=False, rngs={"dropout": k})
    )
    a, b, c = train(jax.random.key(1)), train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, eval_out)


def test_pytorch_default_init_statistics():
    cfg = get_preset("small")
    p = init_params(cfg, jax.random.key(0))
    emb = np.asarray(p["tok_emb"]["embedding"])
    # torch.nn.Embedding: N(0, 1); 12.9M draws -> sample std within 1e-3 of 1.
    assert abs(emb.std() - 1.0) < 1e-3 and abs(emb.mean()) < 1e-3
    w = np.asarray(p["trf_blocks_0"]["ff"]["layers_2"]["kernel"])  # fan_in 4 * 256
    bound = 1 / math.sqrt(4 * cfg.emb_dim)
    # U(-b, b): all within the bound, std b / sqrt(3).
    assert np.abs(w).max() <= bound
    np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.01)
    assert np.all(np.asarray(p["final_norm"]["scale"]) == 1.0)


def test_gpt2_init_scales_residual_projections():
    cfg = get_preset("small").replace(init="gpt2")
    p = init_params(cfg, jax.random.key(0))
    blk = p["trf_blocks_1"]
    np.testing.assert_allclose(np.std(blk["ff"]["layers_0"]["kernel"]), 0.02, rtol=0.02)
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    np.testing.assert_allclose(np.std(blk["att"]["out_proj"]["kernel"]), resid, rtol=0.02)
    assert np.all(np.asarray(blk["ff"]["layers_0"]["bias"]) == 0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_cached_decode_equals_full_forward_at_every_step(small_vocab_config, key, tied):
    cfg = small_vocab_config.replace(qkv_bias=True, tie_embeddings=tied)
    params = init_params(cfg, key)
    model = GPT(cfg)
    ids = _ids(cfg, 2, 16)
    full = model.apply({"params": params}, ids)
    cache = init_cache(cfg, 2)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    step = jax.jit(lambda c, i, q: model.apply({"params": params}, i, c, q, method=GPT.decode))
    logits, cache = step(cache, ids[:, :5], pos[:, :5])  # prefill 5 tokens
    got = [logits]
    for t in range(5, 16):
        logits, cache = step(cache, ids[:, t : t + 1], pos[:, t : t + 1])
        got.append(logits)
    # Attention over a zero-padded, masked cache vs an exact-length one: fp32 rounding only.
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, atol=2e-5, rtol=1e-5)


def test_decode_rows_at_different_positions(small_vocab_config, key):
    cfg = small_vocab_config
    params = init_params(cfg, key)
    model = GPT(cfg)
    a, b = _ids(cfg, 1, 7, seed=1), _ids(cfg, 1, 4, seed=2)
    # Row 1 is right-padded to 7; its pad slots are never attended by its real tokens.
    ids = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 3)))], axis=0)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    decode = jax.jit(lambda p, i, c, q: model.apply({"params": p}, i, c, q, method=GPT.decode))
    logits, _ = decode(params, ids, init_cache(cfg, 2), pos)
    fwd = _fwd(cfg)
    np.testing.assert_allclose(logits[0], fwd(params, a)[0], atol=2e-5)
    np.testing.assert_allclose(logits[1, :4], fwd(params, b)[0], atol=2e-5)


def test_bfloat16_compute_runs(small_vocab_config, key):
    cfg = small_vocab_config.replace(dtype="bfloat16")
    params = init_params(cfg, key)
    assert params["tok_emb"]["embedding"].dtype == jnp.float32
    logits = _fwd(cfg)(params, _ids(cfg, 2, 8))
    assert logits.dtype == jnp.bfloat16 and bool(jnp.isfinite(logits).all())


def test_bad_inputs_are_value_errors(small_vocab_config, key):
    cfg = small_vocab_config
    params = init_params(cfg, key)
    with pytest.raises(ValueError, match="sequence length 17 exceeds context_length=16"):
        GPT(cfg).apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\); got shape \(4,\)"):
        GPT(cfg).apply({"params": params}, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="cache length=17"):
        init_cache(cfg, 1, 17)
