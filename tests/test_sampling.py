"""Tests for jaxgpt.sampling: book parity, cache vs recompute, sampling statistics."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxgpt.config import GPTConfig, get_preset
from jaxgpt.interop.book import from_book_state_dict
from jaxgpt.model import GPT, init_params
from jaxgpt.sampling import (
    _decode_one,
    _generate_padded,
    _pack,
    _prefill,
    _window_logits,
    generate,
    process_logits,
    select_tokens,
)

# Chi-square tests reject at significance 0.001 with a fixed seed: a correct sampler fails one
# with probability 1e-3 per seed, and these seeds pass; a wrong distribution fails by far.
ALPHA = 1e-3
CFG = get_preset("tiny").replace(vocab_size=97)  # ctx 16, emb 32, 2 layers, 2 heads


@pytest.fixture(scope="module")
def params() -> dict:
    return init_params(CFG, jax.random.key(1))


@jax.jit(static_argnames="cfg")
def _forward_padded(params: dict, ids: jax.Array, n: jax.Array, *, cfg: GPTConfig) -> jax.Array:
    """Full uncached forward on ids (1, ctx) right-padded; logits at position n - 1 (causal)."""
    return GPT(cfg).apply({"params": params}, ids)[0, n - 1]


def _last_logits(params: dict, cfg: GPTConfig, seq: list[int]) -> jax.Array:
    """The book's step: logits after the last context_length tokens of seq, no cache."""
    window = seq[-cfg.context_length :]
    ids = np.zeros((1, cfg.context_length), np.int32)
    ids[0, : len(window)] = window
    return _forward_padded(params, jnp.asarray(ids), len(window), cfg=cfg)


def _reference_greedy(params: dict, cfg: GPTConfig, prompt: list[int], n: int) -> list[int]:
    """The book's generate_text_simple, uncached, with jaxgpt's full forward pass."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(jnp.argmax(_last_logits(params, cfg, ids))))
    return ids


# ---------------------------------------------------------------------------------------------
# Parity with the book (llms_from_scratch, PyTorch)


@pytest.fixture(scope="module")
def book_model():
    torch = pytest.importorskip("torch")
    from llms_from_scratch.ch04 import GPTModel
    from parity.parity_refs import randomize_

    torch.manual_seed(123)
    book_cfg = {k: getattr(CFG, k) for k in ("vocab_size", "context_length", "emb_dim")}
    book_cfg |= {"n_heads": CFG.n_heads, "n_layers": CFG.n_layers, "drop_rate": 0.0}
    book_cfg["qkv_bias"] = False
    model = randomize_(GPTModel(book_cfg).eval(), 123)
    # The interop mapping is itself checked against PyTorch in tests/parity.
    return model, from_book_state_dict(model.state_dict(), CFG)[1]


@pytest.mark.torch
def test_greedy_equals_book_including_context_overflow(book_model) -> None:
    import torch
    from llms_from_scratch.ch04 import generate_text_simple

    model, params = book_model
    # Lengths 3 and 12 plus 20 new tokens pass context_length=16; 20 is cropped from the start.
    prompts = [[5, 17, 3], [int(t) for t in np.arange(12) * 7 % 97], list(range(40, 60))]
    ours = generate(params, CFG, prompts, 20)
    for prompt, got in zip(prompts, ours, strict=True):
        book = generate_text_simple(model, torch.tensor([prompt]), 20, CFG.context_length)
        assert got == book[0].tolist()


@pytest.mark.torch
def test_eos_stops_like_book_generate_but_keeps_the_eos(book_model) -> None:
    import torch
    from llms_from_scratch.ch05 import generate as book_generate

    model, params = book_model
    prompt = [5, 17, 3]
    free = generate(params, CFG, [prompt], 10)[0]
    eos = free[len(prompt) + 4]  # the 5th new token
    first = free.index(eos, len(prompt))
    book = book_generate(model, torch.tensor([prompt]), 10, CFG.context_length, eos_id=eos)
    ours = generate(params, CFG, [prompt], 10, eos_id=eos)[0]
    assert ours == free[: first + 1]  # stops at the first eos, eos included
    assert ours[:-1] == book[0].tolist()  # the book drops the eos


# ---------------------------------------------------------------------------------------------
# Cache vs recomputation


def test_cached_decoding_equals_recomputation_every_step(params: dict) -> None:
    # Ragged, right-padded prompts prefilled once, then one token per step on the cache; each
    # step's logits must equal a fresh full forward pass over that row's whole sequence.
    # Tolerance 1e-4 absolute on logits of size ~1-10: fp32 accumulation-order differences.
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    seqs = [list(p) for p in prompts]
    lens = jnp.asarray([len(p) for p in prompts])
    padded = jnp.asarray([p + [0] * (8 - len(p)) for p in prompts])
    cache = _prefill(params, CFG, padded, CFG.context_length)
    step = jax.jit(lambda c, t, q: _decode_one(params, CFG, c, t, q))
    tok = jnp.asarray([s[-1] for s in seqs])
    for i in range(CFG.context_length - 7):
        logits, cache = step(cache, tok, lens - 1 + i)
        for r, s in enumerate(seqs):
            np.testing.assert_allclose(logits[r], _last_logits(params, CFG, s), atol=1e-4, rtol=0)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        for r, s in enumerate(seqs):
            s.append(int(tok[r]))


def test_window_logits_past_context_equal_forward_on_last_ctx_tokens(params: dict) -> None:
    from jaxgpt.decoding import Plan

    ctx = CFG.context_length
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 32)).astype(np.int32)
    lens = np.asarray([25, 9], np.int32)  # one row past the context, one within it
    plan = Plan(CFG, 2, 8, ctx, 32, True, True, None, False, False, 1)
    window_logits = jax.jit(lambda t, n: _window_logits(params, plan, t, n))
    got = window_logits(jnp.asarray(tokens), jnp.asarray(lens))
    for r in range(2):
        want = _last_logits(params, CFG, tokens[r, : lens[r]].tolist())
        np.testing.assert_allclose(got[r], want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Batching, eos, compilation


def test_batched_ragged_prompts_equal_each_alone(params: dict) -> None:
    prompts = [[1, 2, 3], [50, 60, 70, 80, 90, 11, 12], [7], list(range(20, 34))]
    eos = 42
    together = generate(params, CFG, prompts, 9, eos_id=eos)
    for prompt, got in zip(prompts, together, strict=True):
        assert got == generate(params, CFG, [prompt], 9, eos_id=eos)[0]
        assert got == _stop_at(_reference_greedy(params, CFG, prompt, 9), eos, len(prompt))


def _stop_at(ids: list[int], eos: int, start: int) -> list[int]:
    return ids[: ids.index(eos, start) + 1] if eos in ids[start:] else ids


def test_eos_rows_stop_and_others_continue(params: dict) -> None:
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(params, CFG, prompts, 8)
    eos = free[0][3 + 1]  # row 0's second new token
    got = generate(params, CFG, prompts, 8, eos_id=eos)
    assert got[0] == _stop_at(free[0], eos, 3)
    assert got[1] == _stop_at(free[1], eos, 2)
    assert len(got[0]) <= 3 + 2


def test_similar_sizes_do_not_recompile(params: dict) -> None:
    # Batch 3 and 4 share the 4-row bucket; prompt lengths <= 8 the prefill bucket; new tokens,
    # eos id and temperature values are traced arguments.
    generate(params, CFG, [[1, 2, 3], [4, 5], [6]], 5, eos_id=7)  # positions < 8: buckets 8
    before = _generate_padded._cache_size()
    generate(params, CFG, [[9, 8], [7, 6, 5, 4], [3], [1, 2, 3]], 4, eos_id=9)
    generate(params, CFG, [[1, 2], [6], [5], [4]], 6, eos_id=11)
    assert _generate_padded._cache_size() == before


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's compiled HLO")
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_loop_updates_the_cache_in_place(params: dict, batch: int) -> None:
    # A performance guard: the compiled program may materialise each zero cache tensor once
    # (2 per layer); without the region-analysis copy insertion XLA:CPU copied every cache
    # tensor up to three more times per decode step (13 copies here instead of 4).
    args, plan = _pack(CFG, [[1, 2, 3]] * batch, 5, 0.0, None, None, None, 1, 1.0)
    hlo = _generate_padded.lower(params, *args, jax.random.key(0), plan=plan).compile().as_text()
    shape = f"f32[{plan.batch},{CFG.n_heads},{plan.cache_len},{CFG.head_dim}]"
    copies = re.findall(re.escape(shape) + r"\{[\d,]*\} copy\(", hlo)
    assert len(copies) <= 2 * CFG.n_layers


def test_zero_new_tokens_returns_prompts(params: dict) -> None:
    assert generate(params, CFG, [[1, 2], [3]], 0) == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_k": 0, "temperature": 1.0}, "top_k=0"),
        ({"top_k": 98, "temperature": 1.0}, "top_k=98"),
        ({"top_p": 0.0, "temperature": 1.0}, "top_p=0.0"),
        ({"top_p": 1.5, "temperature": 1.0}, "top_p=1.5"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"prompts": [[1], []]}, r"prompts\[1\]"),
        ({"prompts": []}, "prompts"),
        ({"prompts": [[1, 97]]}, "97"),
        ({"eos_id": 97}, "eos_id=97"),
        ({"num_beams": 0}, "num_beams=0"),
        ({"num_beams": 2, "length_penalty": float("nan")}, "length_penalty=nan"),
        ({"temperature": 1.0, "key": None}, "key"),
        ({"num_beams": 2, "temperature": 1.0}, "num_beams=2"),
    ],
)
def test_bad_arguments_raise_value_error(params: dict, kwargs: dict, match: str) -> None:
    args = {"prompts": [[1, 2]], "max_new_tokens": 3, "key": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, **args)


# ---------------------------------------------------------------------------------------------
# Sampling statistics


LOGITS = np.asarray([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


def _draw(n: int, seed: int, **kwargs) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    tok = select_tokens(logits, key=jax.random.key(seed), **kwargs)
    return np.bincount(np.asarray(tok), minlength=LOGITS.size)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    assert counts[probs == 0].sum() == 0, f"drew a filtered-out token: {counts}"
    keep = probs > 0
    expected = counts.sum() * probs[keep] / probs[keep].sum()  # float64, sums exactly
    return stats.chisquare(counts[keep], expected).pvalue


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_draws_match_softmax_of_scaled_logits(temperature: float) -> None:
    counts = _draw(20000, 0, temperature=temperature)
    assert _chi2_pvalue(counts, _softmax(LOGITS / temperature)) > ALPHA


def test_top_k_draws_match_renormalised_top_k() -> None:
    # Book order: top-k on raw logits, then temperature: p ∝ exp(l / T) over the 3 largest.
    probs = np.zeros(LOGITS.size)
    probs[:3] = _softmax(LOGITS[:3] / 0.8)
    counts = _draw(20000, 1, temperature=0.8, top_k=3)
    assert _chi2_pvalue(counts, probs) > ALPHA


def test_top_p_draws_match_nucleus() -> None:
    # softmax(LOGITS) = .405 .245 .149 .090 .055 ...: the mass ranked before each token is
    # 0, .405, .650, .799, .889, ... so top_p = 0.85 keeps the first four tokens.
    base = _softmax(LOGITS.astype(np.float64))
    assert np.allclose(np.cumsum(base)[:4], [0.405, 0.650, 0.799, 0.889], atol=1e-3)
    probs = np.zeros(LOGITS.size)
    probs[:4] = base[:4] / base[:4].sum()
    counts = _draw(20000, 2, temperature=1.0, top_p=0.85)
    assert _chi2_pvalue(counts, probs) > ALPHA


def test_top_k_then_top_p_filters_in_order() -> None:
    # top_k=6 then T=0.5 then top_p=0.8 over the tempered top-6.
    tempered = _softmax(LOGITS[:6] / 0.5)
    n_keep = int(np.sum(np.cumsum(tempered) - tempered < 0.8))
    probs = np.zeros(LOGITS.size)
    probs[:n_keep] = tempered[:n_keep] / tempered[:n_keep].sum()
    got = np.asarray(
        jax.nn.softmax(
            process_logits(jnp.asarray(LOGITS[None]), temperature=0.5, top_k=6, top_p=0.8)
        )
    )[0]
    np.testing.assert_allclose(got, probs, atol=1e-6)
    counts = _draw(20000, 3, temperature=0.5, top_k=6, top_p=0.8)
    assert _chi2_pvalue(counts, probs) > ALPHA


def test_greedy_ignores_filters_and_needs_no_key() -> None:
    tok = select_tokens(jnp.asarray(LOGITS[None]), temperature=0.0, top_k=2, top_p=0.1)
    assert int(tok[0]) == 0


def test_generate_first_token_distribution_matches_model(params: dict) -> None:
    # End to end: 256 identical rows draw independent first tokens; the target distribution is
    # the model's own next-token softmax (full forward pass), top_k=4 at temperature 1.5.
    prompt = [3, 1, 4]
    logits = np.asarray(GPT(CFG).apply({"params": params}, jnp.asarray([prompt]))[0, -1])
    top = np.argsort(-logits)[:4]
    probs = np.zeros(CFG.vocab_size)
    probs[top] = _softmax(logits[top] / 1.5)
    counts = np.zeros(CFG.vocab_size, np.int64)
    for seed in range(8):
        out = generate(
            params, CFG, [prompt] * 256, 1, temperature=1.5, top_k=4, key=jax.random.key(seed)
        )
        counts += np.bincount([o[-1] for o in out], minlength=CFG.vocab_size)
    assert _chi2_pvalue(counts, probs) > ALPHA


def test_same_key_same_output_different_key_differs(params: dict) -> None:
    kw = {"temperature": 1.0, "max_new_tokens": 8}
    a = generate(params, CFG, [[1, 2]], key=jax.random.key(5), **kw)
    b = generate(params, CFG, [[1, 2]], key=jax.random.key(5), **kw)
    c = generate(params, CFG, [[1, 2]], key=jax.random.key(6), **kw)
    assert a == b and a != c
