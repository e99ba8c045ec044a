"""Text generation on a KV cache: greedy, temperature, top-k, top-p, end-of-text stop.

The whole decode runs as one compiled XLA program per shape bucket: prefill the prompts once,
then one token per step inside `lax.while_loop`, with the cache carried through the loop.
Beam search (`num_beams > 1`) plugs its own state update into the same loop (`jaxgpt.beam`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import beam
from jaxgpt.config import GPTConfig
from jaxgpt.decoding import Dyn, Plan
from jaxgpt.model import GPT, Cache, Params, init_cache, unstack_blocks

_MIN_SEQ_BUCKET = 8


# ---------------------------------------------------------------------------------------------
# Token selection


def process_logits(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """The distribution a sampled token is drawn from, as logits with removed tokens at -inf.

    Book order (ch. 5.3): keep the `top_k` largest logits (ties with the k-th value kept, as
    the book's `logits < min_val` test), divide by `temperature`, then keep the smallest set of
    most likely tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2019;
    tokens tied with the last kept one are kept too).

    Args:
      logits: float (batch, vocab).
      temperature: > 0.
      top_k: static int in [1, vocab] or None.
      top_p: in (0, 1] or None.

    Returns:
      float32 (batch, vocab) logits; `softmax` of them is the sampling distribution.
    """
    logits = logits.astype(jnp.float32)  # (batch, vocab)
    ranked = None
    if top_k is not None:
        ranked = jax.lax.top_k(logits, top_k)[0]  # (batch, k), descending
        logits = jnp.where(logits < ranked[:, -1:], -jnp.inf, logits)
    logits = logits / temperature
    if top_p is not None:
        # Rank only the top-k survivors when there are any: no sort over the whole vocabulary.
        ranked = -jnp.sort(-logits, axis=-1) if ranked is None else ranked / temperature
        probs = jax.nn.softmax(ranked, axis=-1)  # (batch, n) descending
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # (batch, 1), >= 1
        threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)  # (batch, 1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def select_tokens(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 0.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    greedy: bool | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Pick the next token of each row: argmax when greedy, else a draw from `process_logits`.

    Args:
      logits: float (batch, vocab) next-token logits.
      temperature: 0 means greedy argmax (the book); > 0 scales the logits before sampling.
      top_k, top_p: filters, see `process_logits`; ignored when greedy (argmax survives them).
      greedy: static override of `temperature == 0` when `temperature` is traced.
      key: PRNG key, required when sampling.

    Returns:
      int32 (batch,) token ids.
    """
    if greedy is None:
        greedy = float(temperature) == 0.0
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs key=jax.random.key(seed)")
    filtered = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Model calls


def _prefill(params: Params, config: GPTConfig, ids: jax.Array, cache_len: int) -> Cache:
    """Write ids (batch, seq) at positions 0..seq-1 of a fresh cache; logits are dropped by XLA."""
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cache = init_cache(config, b, cache_len)
    _, cache = GPT(config).apply({"params": params}, ids, cache, positions, method=GPT.decode)
    return cache


def _decode_one(
    params: Params, config: GPTConfig, cache: Cache, tok: jax.Array, pos: jax.Array
) -> tuple[jax.Array, Cache]:
    """Feed tok (batch,) at pos (batch,); return next-token logits (batch, vocab) in fp32."""
    logits, cache = GPT(config).apply(
        {"params": params}, tok[:, None], cache, pos[:, None], method=GPT.decode
    )
    return logits[:, 0].astype(jnp.float32), cache


def _last_tokens(tokens: jax.Array, lens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(tokens, (lens - 1)[:, None], axis=1)[:, 0]  # (rows,)


def _window_logits(params: Params, plan: Plan, tokens: jax.Array, lens: jax.Array) -> jax.Array:
    """Book semantics past the context: rerun the model on each row's last context_length tokens
    at positions 0..ctx-1 (a fresh prefill + one decode step, so the vocab head runs once)."""
    ctx = plan.config.context_length
    start = jnp.maximum(lens - ctx, 0)  # (rows,)
    window = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (ctx,)))(tokens, start)
    cache = _prefill(params, plan.config, window[:, : ctx - 1], ctx) if ctx > 1 else None
    if cache is None:
        cache = init_cache(plan.config, tokens.shape[0], ctx)
    pos = lens - 1 - start  # (rows,) in [0, ctx)
    logits, _ = _decode_one(params, plan.config, cache, _last_tokens(window, pos + 1), pos)
    return logits


# ---------------------------------------------------------------------------------------------
# Decoding strategies: state update after one step's logits


class _SampleState(NamedTuple):
    tokens: jax.Array  # (rows, buf) int32: conditioning prompt then new tokens
    lens: jax.Array  # (rows,) int32
    done: jax.Array  # (rows,) bool
    step: jax.Array  # () int32
    key: jax.Array


def _sample_update(
    st: _SampleState, logits: jax.Array, plan: Plan, dyn: Dyn
) -> tuple[_SampleState, jax.Array | None]:
    key = jax.random.fold_in(st.key, st.step)
    tok = select_tokens(
        logits,
        temperature=dyn.temperature,
        top_k=plan.top_k,
        top_p=dyn.top_p if plan.use_top_p else None,
        greedy=plan.greedy,
        key=key,
    )  # (rows,)
    live = ~st.done
    rows = jnp.arange(tok.shape[0])
    tokens = st.tokens.at[rows, st.lens].set(jnp.where(live, tok, 0), mode="drop")
    done = st.done | (live & (tok == dyn.eos_id)) if plan.use_eos else st.done
    lens = st.lens + live.astype(jnp.int32)
    return _SampleState(tokens, lens, done, st.step + 1, st.key), None


# ---------------------------------------------------------------------------------------------
# The compiled program


def _gather_cache(cache: Cache, rows: jax.Array) -> Cache:
    return jax.tree_util.tree_map(lambda c: c[rows], cache)


# XLA:CPU's copy insertion by default copies every loop-carried KV-cache tensor (up to three
# times) each step at batch 1; the region analysis proves the in-place cache update safe.
# Only XLA:CPU reads this option.
_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.partial(jax.jit, static_argnames=("plan",), compiler_options=_COMPILER_OPTIONS)
def _generate_padded(
    params: Params, tokens: jax.Array, lens: jax.Array, dyn: Dyn, key: jax.Array, *, plan: Plan
) -> tuple[jax.Array, jax.Array]:
    """tokens (batch, buf) right-padded prompts, lens (batch,) -> (rows, buf) tokens and lens."""
    b, k, cfg = plan.batch, plan.num_beams, plan.config
    live = jnp.arange(b) < jnp.sum(lens > 0)  # padding rows have len 0
    lens = jnp.maximum(lens, 1)
    cache = _prefill(params, cfg, tokens[:, : plan.prefill_len], plan.cache_len)
    if k == 1:
        update = _sample_update
        st = _SampleState(tokens, lens, ~live, jnp.int32(0), key)
    else:
        update = beam.beam_update
        cache = jax.tree_util.tree_map(lambda c: jnp.repeat(c, k, axis=0), cache)
        st = beam.init_beams(tokens, lens, live, plan)

    def more(st: NamedTuple) -> jax.Array:
        return (st.step < dyn.n_new) & ~jnp.all(st.done)  # rows (sampling) or prompts (beams)

    def fits_cache(st: NamedTuple) -> jax.Array:
        # Every row feeds position lens - 1, which must be a cache slot (and < context_length).
        return jnp.max(st.lens) <= plan.cache_len

    def cached_step(carry: tuple[NamedTuple, Cache]) -> tuple[NamedTuple, Cache]:
        st, cache = carry
        pos = jnp.minimum(st.lens - 1, plan.cache_len - 1)
        logits, cache = _decode_one(params, cfg, cache, _last_tokens(st.tokens, st.lens), pos)
        st, parent = update(st, logits, plan, dyn)
        if parent is not None:
            cache = _gather_cache(cache, parent)
        return st, cache

    cond = (lambda c: more(c[0]) & fits_cache(c[0])) if plan.overflow else (lambda c: more(c[0]))
    st, _ = jax.lax.while_loop(cond, cached_step, (st, cache))
    if plan.overflow:
        # Past the context the book re-bases positions to 0..ctx-1 every step; a KV cache cannot
        # shift positions, so each step recomputes the window (the book's cost), still on device.
        def window_step(st: NamedTuple) -> NamedTuple:
            return update(st, _window_logits(params, plan, st.tokens, st.lens), plan, dyn)[0]

        st = jax.lax.while_loop(more, window_step, st)
    if k == 1:
        return st.tokens, st.lens
    return beam.finish_beams(st, plan, dyn)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def check_generate_args(
    config: GPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    num_beams: int,
    key: jax.Array | None,
    length_penalty: float = 1.0,
) -> None:
    """Raise ValueError naming the offending value for any bad `generate` argument."""
    v = config.vocab_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and not 1 <= top_k <= v:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={v}] or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
    if eos_id is not None and not 0 <= eos_id < v:
        raise ValueError(f"eos_id={eos_id} must be a token id in [0, {v})")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be an int >= 1")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty} must be a finite number")
    if num_beams > 1 and (temperature > 0 or top_k is not None or top_p is not None):
        raise ValueError(
            f"num_beams={num_beams} is deterministic beam search; drop temperature/top_k/top_p"
        )
    if temperature > 0 and key is None:
        raise ValueError(f"temperature={temperature} samples; pass key=jax.random.key(seed)")
    if isinstance(prompts, str | bytes) or len(prompts) == 0:
        raise ValueError(f"prompts={prompts!r} must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, str | bytes) or len(p) == 0:
            raise ValueError(f"prompts[{i}]={p!r} is empty or not a token-id list; encode it first")
        lo, hi = int(np.min(p)), int(np.max(p))
        if lo < 0 or hi >= v:
            raise ValueError(f"prompts[{i}] has token id {lo if lo < 0 else hi} outside [0, {v})")


def _pack(
    config: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    num_beams: int,
    length_penalty: float,
) -> tuple[tuple[jax.Array, jax.Array, Dyn], Plan]:
    """Bucketed, right-padded (tokens, lens, dyn) and the static plan of one `generate` call."""
    ctx = config.context_length
    conds = [p[-ctx:] for p in prompts]  # the book's idx[:, -context_size:]
    max_len = max(len(c) for c in conds)
    batch = _bucket(len(prompts))
    prefill_len = min(_bucket(max_len, _MIN_SEQ_BUCKET), ctx)
    need = max_len + max_new_tokens - 1  # highest position fed + 1
    cache_len = min(_bucket(max(need, prefill_len), _MIN_SEQ_BUCKET), ctx)
    overflow = need > cache_len
    buf_len = _bucket(max_len + max_new_tokens, _MIN_SEQ_BUCKET)
    if overflow:
        buf_len = max(buf_len, ctx)
    tokens = np.zeros((batch, buf_len), np.int32)
    lens = np.zeros((batch,), np.int32)
    for i, c in enumerate(conds):
        tokens[i, : len(c)] = c
        lens[i] = len(c)
    use_top_p = top_p is not None and top_p < 1.0
    plan = Plan(
        config=config,
        batch=batch,
        prefill_len=prefill_len,
        cache_len=cache_len,
        buf_len=buf_len,
        overflow=overflow,
        greedy=temperature == 0.0,
        top_k=None if temperature == 0.0 or top_k == config.vocab_size else top_k,
        use_top_p=use_top_p and temperature > 0.0,
        use_eos=eos_id is not None,
        num_beams=num_beams,
    )
    dyn = Dyn(
        n_new=jnp.int32(max_new_tokens),
        temperature=jnp.float32(temperature),
        top_p=jnp.float32(top_p if use_top_p else 1.0),
        eos_id=jnp.int32(-1 if eos_id is None else eos_id),
        length_penalty=jnp.float32(length_penalty),
    )
    return (jnp.asarray(tokens), jnp.asarray(lens), dyn), plan


def generate(
    params: Params,
    config: GPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    key: jax.Array | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens, as the book's `generate` (ch. 5.3).

    Decoding: greedy argmax when `temperature == 0`; otherwise top-k filter, then temperature,
    then top-p, then a categorical draw (`process_logits`). `num_beams > 1` is beam search
    (deterministic; scores are sum of log-probabilities / new_length ** length_penalty, the
    Hugging Face convention) and returns the best hypothesis per prompt.

    All prompts run as one batch (right-padded; each row has its own positions), compiled once
    per shape bucket: batch, prompt length and prompt + new length are padded up to powers of
    two, so similar calls reuse the compiled program. Prompts are prefilled once (the vocab head
    is not computed there), then one token per step is decoded on the KV cache inside
    `lax.while_loop`; the cache holds the bucket of prompt + new tokens, not the whole context,
    so attention reads at most twice the filled part. Temperature, top-p, eos id, length
    penalty and max_new_tokens are traced values; top-k and which filters are on are static.

    End of text: a row stops once it produces `eos_id`; the eos token is included in its result
    (the book's `generate` stops before appending it, and only for batch 1).

    Context overflow: the model conditions on the last `context_length` tokens with positions
    re-based to 0..ctx-1, exactly as the book crops `idx[:, -context_size:]`. Prompts longer than
    the context are cropped for conditioning (the result still starts with the whole prompt).
    A KV cache cannot shift positions, so once a row would pass `context_length` the remaining
    steps recompute the model over each row's window (the book's cost per step), on device.

    Args:
      params: model parameters.
      config: the model's GPTConfig.
      prompts: token-id lists, non-empty, of any lengths.
      max_new_tokens: >= 0 new tokens per prompt (fewer when eos stops a row).
      temperature: 0 for greedy, > 0 to sample (needs `key`).
      top_k: keep the k most likely tokens, 1 <= k <= vocab_size.
      top_p: nucleus mass in (0, 1].
      eos_id: token id that ends a row.
      num_beams: beam width; 1 means no beam search.
      length_penalty: beam-score exponent on the new length (> 0 favours longer endings).
      key: PRNG key for sampling.

    Returns:
      One list per prompt: the prompt's ids followed by its new ids.
    """
    check_generate_args(
        config, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, num_beams, key,
        length_penalty,
    )  # fmt: skip
    prompts = [[int(t) for t in p] for p in prompts]
    if max_new_tokens == 0:
        return prompts
    params, args, key, plan = _call(
        params, config, prompts, max_new_tokens, key, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=eos_id, num_beams=num_beams, length_penalty=length_penalty,
    )  # fmt: skip
    out_tokens, out_lens = jax.device_get(_generate_padded(params, *args, key, plan=plan))
    ctx = plan.config.context_length
    conds = [p[-ctx:] for p in prompts]
    return [
        p + out_tokens[i, len(c) : out_lens[i]].tolist()
        for i, (p, c) in enumerate(zip(prompts, conds, strict=True))
    ]


def _call(
    params: Params,
    config: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    key: jax.Array | None,
    **options: Any,
) -> tuple[Params, tuple[jax.Array, jax.Array, Dyn], jax.Array, Plan]:
    """The arguments of `_generate_padded` for one checked `generate` call: (params, (tokens,
    lens, dyn), key, plan); `options`: the call's temperature ... length_penalty (`_pack`'s).
    `params` may be ShapeDtypeStructs (their layers keep the sharding)."""
    params = unstack_blocks(params, take=_layer)  # the KV cache runs on unrolled layers
    config = config.replace(scan_layers=False)
    args, plan = _pack(config, prompts, max_new_tokens, **options)
    return params, args, jax.random.key(0) if key is None else key, plan  # key unused if greedy


def precompile(
    params: Params,
    config: GPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    **options: Any,
) -> None:
    """Compile, without running, the program `generate(params, config, prompts,
    max_new_tokens, **options)` runs. `params` may be ShapeDtypeStructs; give each the
    sharding the real call's params will have (none: not committed to a device)."""
    kw = {"temperature": 0.0, "top_k": None, "top_p": None, "eos_id": None, "num_beams": 1,
          "length_penalty": 1.0, **options}  # fmt: skip
    key = kw.pop("key", None)
    check_generate_args(config, prompts, max_new_tokens, key=key, **kw)
    prompts = [[int(t) for t in p] for p in prompts]
    params, args, key, plan = _call(params, config, prompts, max_new_tokens, key, **kw)
    _generate_padded.lower(params, *args, key, plan=plan).compile()


def _layer(leaf: Any, i: int) -> Any:
    """Layer i of a stacked leaf, concrete or abstract (keeping a one-device sharding)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=leaf.sharding)
    return leaf[i]
