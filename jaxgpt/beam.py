"""Beam search for `jaxgpt.generate(..., num_beams=k)`: the state carried through the decode loop,
its per-step update (top 2k candidates, finished hypotheses pooled) and the final pick.

Scores follow Hugging Face: sum of log-probabilities of the new tokens / new_length **
length_penalty. The decode loop itself (prefill, KV cache, `lax.while_loop`) is `jaxgpt.sampling`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.decoding import Dyn, Plan


class _BeamState(NamedTuple):
    tokens: jax.Array  # (rows = batch * beams, buf) running beams
    lens: jax.Array  # (rows,)
    sums: jax.Array  # (batch, beams) float32 sum of log-probabilities of the new tokens
    pool_tokens: jax.Array  # (batch, beams, buf) finished hypotheses (ended at eos)
    pool_lens: jax.Array  # (batch, beams)
    pool_scores: jax.Array  # (batch, beams) normalised scores, -inf when empty
    done: jax.Array  # (batch,) no running beam can beat the best finished one
    step: jax.Array  # () int32


def init_beams(tokens: jax.Array, lens: jax.Array, live: jax.Array, plan: Plan) -> _BeamState:
    """k copies of each prompt, only the first live: tokens (batch, buf), lens/live (batch,)."""
    b, k = plan.batch, plan.num_beams
    sums = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)  # one live beam at first
    return _BeamState(
        tokens=jnp.repeat(tokens, k, axis=0),
        lens=jnp.repeat(lens, k),
        sums=jnp.broadcast_to(sums, (b, k)).astype(jnp.float32),
        pool_tokens=jnp.zeros((b, k, plan.buf_len), jnp.int32),
        pool_lens=jnp.ones((b, k), jnp.int32),
        pool_scores=jnp.full((b, k), -jnp.inf, jnp.float32),
        done=~live,
        step=jnp.int32(0),
    )


def beam_update(
    st: _BeamState, logits: jax.Array, plan: Plan, dyn: Dyn
) -> tuple[_BeamState, jax.Array]:
    b, k, v = plan.batch, plan.num_beams, plan.config.vocab_size
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, v)
    cand = (st.sums[:, :, None] + logp).reshape(b, k * v)
    # 2k candidates: each beam adds at most one eos candidate, so >= k of them continue.
    vals, idx = jax.lax.top_k(cand, 2 * k)  # (batch, 2k)
    parent = idx // v + (jnp.arange(b) * k)[:, None]  # (batch, 2k) row of the parent beam
    tok = (idx % v).astype(jnp.int32)
    gen_len = (st.step + 1).astype(jnp.float32)
    seqs = st.tokens[parent]  # (batch, 2k, buf)
    lens = st.lens[parent]  # (batch, 2k)
    seqs = jax.vmap(jax.vmap(lambda s, n, t: s.at[n].set(t, mode="drop")))(seqs, lens, tok)
    if plan.use_eos:
        is_eos = tok == dyn.eos_id
        # Finished hypotheses join the pool; score = sum logprob / new_len ** length_penalty.
        scores = jnp.where(is_eos, vals / gen_len**dyn.length_penalty, -jnp.inf)
        all_scores = jnp.concatenate([st.pool_scores, scores], axis=1)  # (batch, 3k)
        best, pick = jax.lax.top_k(all_scores, k)
        take = jax.vmap(lambda x, i: x[i])
        pool_tokens = take(jnp.concatenate([st.pool_tokens, seqs], axis=1), pick)
        pool_lens = take(jnp.concatenate([st.pool_lens, lens + 1], axis=1), pick)
        pool_scores = best
    else:
        is_eos = jnp.zeros_like(tok, dtype=bool)
        pool_tokens, pool_lens, pool_scores = st.pool_tokens, st.pool_lens, st.pool_scores
    # The k best candidates that did not end: stable order of rank, eos ones pushed last.
    rank = jnp.arange(2 * k)[None, :] + jnp.where(is_eos, 2 * k, 0)
    keep = jnp.argsort(rank, axis=1)[:, :k]  # (batch, k)
    take = jax.vmap(lambda x, i: x[i])
    sums = take(vals, keep)
    rows_parent = take(parent, keep).reshape(b * k)
    tokens = take(seqs, keep).reshape(b * k, -1)
    new_lens = take(lens, keep).reshape(b * k) + 1
    # Exact stop: logprobs <= 0, so a running beam's final score is at most sums / n**lp
    # when lp >= 0 (longest), sums / (gen_len + 1)**lp when lp < 0 (shortest).
    lp = dyn.length_penalty
    n = jnp.where(lp >= 0, dyn.n_new.astype(jnp.float32), gen_len + 1.0)
    bound = jnp.max(sums / n**lp, axis=1)  # (batch,)
    done = st.done | (pool_scores[:, 0] >= bound)
    new = _BeamState(tokens, new_lens, sums, pool_tokens, pool_lens, pool_scores, done, st.step + 1)
    return new, rows_parent


def finish_beams(st: _BeamState, plan: Plan, dyn: Dyn) -> tuple[jax.Array, jax.Array]:
    """Best hypothesis per prompt among finished and running beams: tokens (batch, buf), lens."""
    b, k = plan.batch, plan.num_beams
    run_scores = st.sums / jnp.maximum(st.step, 1).astype(jnp.float32) ** dyn.length_penalty
    scores = jnp.concatenate([st.pool_scores, run_scores], axis=1)  # (batch, 2k), pool first
    tokens = jnp.concatenate([st.pool_tokens, st.tokens.reshape(b, k, -1)], axis=1)
    lens = jnp.concatenate([st.pool_lens, st.lens.reshape(b, k)], axis=1)
    best = jnp.argmax(scores, axis=1)  # first of ties: finished hypotheses win
    rows = jnp.arange(b)
    return tokens[rows, best], lens[rows, best]
