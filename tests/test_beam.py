"""Tests for jaxgpt.beam through `generate(..., num_beams=k)`: exact against exhaustive search."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import get_preset
from jaxgpt.model import GPT, init_params
from jaxgpt.sampling import generate

BEAM_CFG = get_preset("tiny").replace(vocab_size=4)


@pytest.fixture(scope="module")
def beam_params() -> dict:
    return init_params(BEAM_CFG, jax.random.key(7))


def _exhaustive_best(params: dict, prompt: list[int], n: int, eos: int | None, lp: float):
    """Score every continuation of up to n tokens (ending at the first eos) by full forwards."""
    cands = []
    for length in range(1, n + 1):
        for tail in itertools.product(range(BEAM_CFG.vocab_size), repeat=length):
            ended = eos is not None and tail[-1] == eos
            if (eos is not None and eos in tail[:-1]) or (length < n and not ended):
                continue
            cands.append(list(tail))
    seqs = np.asarray([prompt + c + [0] * (n - len(c)) for c in cands])
    logp = jax.nn.log_softmax(GPT(BEAM_CFG).apply({"params": params}, jnp.asarray(seqs)), -1)
    logp = np.asarray(logp, np.float64)
    scores = [
        sum(logp[i, len(prompt) - 1 + j, t] for j, t in enumerate(c)) / len(c) ** lp
        for i, c in enumerate(cands)
    ]
    return prompt + cands[int(np.argmax(scores))]


def test_one_beam_equals_greedy(beam_params: dict) -> None:
    prompts = [[1, 2, 3], [0]]
    assert generate(beam_params, BEAM_CFG, prompts, 6, num_beams=1) == generate(
        beam_params, BEAM_CFG, prompts, 6
    )


@pytest.mark.parametrize(("eos", "lp"), [(None, 1.0), (2, 1.0), (2, 0.0), (2, 2.0)])
def test_wide_beam_equals_exhaustive_search(beam_params: dict, eos: int | None, lp: float) -> None:
    # 4 new tokens over a 4-token vocabulary: 4**3 = 64 beams keep every prefix, so beam search
    # is exact and must return the exhaustive argmax of sum logprob / new_len ** lp.
    prompts = [[1, 3, 0], [2]]
    got = generate(beam_params, BEAM_CFG, prompts, 4, num_beams=64, eos_id=eos, length_penalty=lp)
    for prompt, g in zip(prompts, got, strict=True):
        assert g == _exhaustive_best(beam_params, prompt, 4, eos, lp)


def test_narrow_beam_scores_at_least_greedy_and_finds_better(beam_params: dict) -> None:
    # On this model (seed 7) greedy is not optimal; 2 beams recover the exhaustive best here.
    prompt = [1, 3, 0]
    best = _exhaustive_best(beam_params, prompt, 4, None, 1.0)
    greedy = generate(beam_params, BEAM_CFG, [prompt], 4)[0]
    beam = generate(beam_params, BEAM_CFG, [prompt], 4, num_beams=3)[0]
    assert beam == best
    assert greedy != best


def test_imports_run_one_way() -> None:
    # decoding <- beam <- sampling: beam search never reaches back into the decode loop.
    import ast
    from pathlib import Path

    import jaxgpt.beam

    tree = ast.parse(Path(jaxgpt.beam.__file__).read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    assert "jaxgpt.decoding.Plan" in names and not any("sampling" in n for n in names), names
