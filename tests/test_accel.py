"""Accelerator switches (issue 9), each proven on CPU to compute the book's training: fused
attention, scanned layers, rematerialisation, gradient accumulation, bf16 mixed precision."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt
from jaxgpt import checkpoint, generate
from jaxgpt.config import TrainConfig, get_preset
from jaxgpt.model import GPT, fit_vocab, init_params, stack_blocks, unstack_blocks
from jaxgpt.optim import adam_state, make_optimizer
from jaxgpt.step import init_train_state, loss_and_grads, make_train_step


def _batches(config, n, batch=8, seq=16, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (n, batch, seq + 1)).astype(np.int32)
    return [(jnp.asarray(b[:, :-1]), jnp.asarray(b[:, 1:])) for b in ids]


@functools.lru_cache(maxsize=8)  # the float32 reference runs serve several tests
def _trajectory(config, n_steps, *, grad_accum=1, batch=8, lr=1e-3, repeat=False):
    """Losses of n_steps AdamW updates on fixed random batches (or the first one repeated),
    and the final state."""
    tc = TrainConfig(lr=lr, batch_size=batch, grad_accum=grad_accum)
    tx = make_optimizer(tc, n_steps)
    step = make_train_step(config, tx, grad_accum)
    state = init_train_state(config, tx, jax.random.key(0))
    batches = _batches(config, n_steps, batch=batch)
    losses = []
    for i in range(n_steps):
        state, m = step(state, batches[0 if repeat else i])
        losses.append(float(m["loss"]))
    return np.array(losses), state


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def _logits(config, params, ids, **kw):
    return jax.jit(lambda p, x: GPT(config).apply({"params": p}, x, **kw))(params, ids)


# --- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_attention_matches_book_masked_softmax(small_vocab_config, impl) -> None:
    cfg = small_vocab_config.replace(n_layers=1)
    params = init_params(cfg, jax.random.key(0))
    x, y = _batches(cfg, 1, batch=2)[0]
    ref = _logits(cfg, params, x)
    got = _logits(cfg.replace(attention=impl), params, x)
    # float32 both ways: the same products, summed in another order (rel. error ~1e-7).
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)

    def loss(c):
        return lambda p: jnp.mean(GPT(c).apply({"params": p}, x) ** 2)

    g_ref = jax.jit(jax.grad(loss(cfg)))(params)
    g_got = jax.jit(jax.grad(loss(cfg.replace(attention=impl))))(params)
    assert _max_diff(g_ref, g_got) < 1e-5


def test_auto_attention_keeps_book_dropout_and_fused_drops_it(small_vocab_config) -> None:
    cfg = small_vocab_config.replace(n_layers=1, drop_rate=0.5)
    params = init_params(cfg, jax.random.key(0))
    x, _ = _batches(cfg, 1, batch=2)[0]
    kw = dict(deterministic=False, rngs={"dropout": jax.random.key(3)})
    book = _logits(cfg, params, x, **kw)
    auto = _logits(cfg.replace(attention="auto"), params, x, **kw)
    xla = _logits(cfg.replace(attention="xla"), params, x, **kw)
    # auto while dropout is on: the very same program as the book's path, bit for bit.
    np.testing.assert_array_equal(auto, book)
    # xla cannot drop attention weights: it must differ (by far more than rounding).
    assert float(jnp.max(jnp.abs(xla - book))) > 1e-2


@pytest.mark.gpu
def test_cudnn_attention_matches_book_on_gpu(small_vocab_config) -> None:
    # cuDNN flash attention needs 16-bit inputs and head_dim a multiple of 8.
    cfg = small_vocab_config.replace(emb_dim=128, n_heads=2, n_layers=1, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    x, _ = _batches(cfg, 1, batch=2)[0]
    ref = _logits(cfg.replace(attention="xla"), params, x).astype(jnp.float32)
    got = _logits(cfg.replace(attention="cudnn"), params, x).astype(jnp.float32)
    # Both bf16 with float32 softmax; outputs round to bf16 (u = 2**-8) a few times on the way.
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(got, ref, atol=8 * 2**-8 * scale, rtol=0)


@pytest.mark.gpu
def test_switches_on_gpu_match_cpu_float32(small_vocab_config) -> None:
    # Scan + remat + fused XLA attention on the GPU against the book's path on the CPU, float32
    # at "highest" precision (no TF32): the same sums in another order, ~1e-6 of O(1) logits.
    cfg = small_vocab_config
    fast = cfg.replace(scan_layers=True, remat="block", attention="xla")
    params = init_params(cfg, jax.random.key(0))
    x, _ = _batches(cfg, 1, batch=2)[0]
    cpu = jax.devices("cpu")[0]
    want = _logits(cfg, jax.device_put(params, cpu), jax.device_put(x, cpu))
    gpu = jax.devices("gpu")[0]
    got = _logits(fast, jax.device_put(stack_blocks(params), gpu), jax.device_put(x, gpu))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


# --- scanned layers --------------------------------------------------------------------------


def test_scanned_layers_same_logits_and_trajectory(small_vocab_config) -> None:
    cfg = small_vocab_config
    scan = cfg.replace(scan_layers=True)
    params = init_params(cfg, jax.random.key(0))
    stacked = init_params(scan, jax.random.key(0))
    assert set(stacked) == {"tok_emb", "pos_emb", "trf_blocks", "final_norm", "out_head"}
    assert stacked["trf_blocks"]["att"]["W_query"]["kernel"].shape == (2, 32, 32)
    assert _max_diff(unstack_blocks(stacked), params) == 0.0  # same key, same model
    x, _ = _batches(cfg, 1, batch=2)[0]
    # float32, same ops in the same order; XLA fuses the loop body differently (~1e-7).
    np.testing.assert_allclose(_logits(scan, stacked, x), _logits(cfg, params, x), atol=1e-6)
    loss_u, state_u = _trajectory(cfg, 5)
    loss_s, state_s = _trajectory(scan, 5)
    np.testing.assert_allclose(loss_s, loss_u, atol=1e-6, rtol=0)
    assert _max_diff(unstack_blocks(state_s.params), state_u.params) < 1e-6
    # The optimizer moments are stacked the same way and convert back exactly.
    mu_s = adam_state(state_s.opt_state).mu
    assert _max_diff(unstack_blocks(mu_s), adam_state(state_u.opt_state).mu) < 1e-6
    assert _max_diff(stack_blocks(unstack_blocks(mu_s)), mu_s) == 0.0


def test_checkpoint_of_one_layout_loads_into_the_other(small_vocab_config, tmp_path) -> None:
    unrolled, scanned = small_vocab_config, small_vocab_config.replace(scan_layers=True)
    runs = {cfg: _trajectory(cfg, 5)[1] for cfg in (unrolled, scanned)}  # cached above
    tx = make_optimizer(TrainConfig(lr=1e-3, batch_size=8), 5)
    for write, read in ((scanned, unrolled), (unrolled, scanned)):
        folder = tmp_path / f"scan_{write.scan_layers}"
        with checkpoint.manager(folder) as mngr:
            checkpoint.save(mngr, runs[write], {"tokens_seen": 0})
        # On disk: always the unrolled layout.
        meta = json.loads((folder / "checkpoints" / "5" / "state" / "_METADATA").read_text())
        assert any("trf_blocks_1" in k for k in json.dumps(meta).split('"'))
        like = jax.eval_shape(lambda c=read: init_train_state(c, tx, jax.random.key(0)))
        with checkpoint.manager(folder, read_only=True) as mngr:
            got, _ = checkpoint.restore(mngr, like)
        assert jax.tree.structure(got) == jax.tree.structure(like)
        # The restored state is the reading layout's own 5-step run (float32, ~1e-7 apart).
        assert _max_diff(got.params, runs[read].params) < 1e-6
        assert _max_diff(adam_state(got.opt_state).nu, adam_state(runs[read].opt_state).nu) < 1e-6


def test_params_file_load_and_sampler_accept_both_layouts(small_vocab_config, tmp_path) -> None:
    cfg = small_vocab_config
    scan = cfg.replace(scan_layers=True)
    stacked = init_params(scan, jax.random.key(0))
    checkpoint.save_params(tmp_path / "p.npz", scan, stacked)
    with np.load(tmp_path / "p.npz") as f:
        assert "trf_blocks_1/att/W_query/kernel" in f.files  # unrolled on disk
    loaded_cfg, loaded = checkpoint.load_params(tmp_path / "p.npz")
    assert loaded_cfg == scan and _max_diff(loaded, stacked) == 0.0
    prompt = [[1, 2, 3], [4]]
    want = generate(unstack_blocks(stacked), cfg, prompt, max_new_tokens=5)
    assert generate(stacked, scan, prompt, max_new_tokens=5) == want


# --- rematerialisation -----------------------------------------------------------------------


def _grad_temp_bytes(config, batch=8) -> int:
    """Peak temporaries of the compiled gradient (XLA's memory analysis), in bytes."""
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((batch, config.context_length), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(GPT(config).apply({"params": p}, x))))
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_changes_nothing_but_memory(small_vocab_config, remat) -> None:
    cfg = small_vocab_config
    loss_n, state_n = _trajectory(cfg, 5)
    loss_r, state_r = _trajectory(cfg.replace(remat=remat), 5)
    # Recomputation repeats the same float32 ops; XLA may fuse them differently (~1e-7).
    np.testing.assert_allclose(loss_r, loss_n, atol=1e-6, rtol=0)
    # Params: Adam divides by sqrt(v), which magnifies ulp-level gradient differences of
    # near-zero gradient entries; 1e-5 is a few float32 ulps of these O(1) weights.
    assert _max_diff(state_r.params, state_n.params) < 1e-5
    # Peak temporaries shrink: each block's activations are recomputed, not kept. Scanned, so
    # the recomputation sits inside the backward loop (XLA:CPU hoists it out of an unrolled
    # program, where its memory analysis shows no change; see the README).
    big = cfg.replace(context_length=128, emb_dim=64, n_heads=4, n_layers=4, scan_layers=True)
    assert _grad_temp_bytes(big.replace(remat=remat)) < 0.75 * _grad_temp_bytes(big)


# --- gradient accumulation -------------------------------------------------------------------


def test_grad_accum_equals_one_full_batch_step(small_vocab_config) -> None:
    cfg = small_vocab_config  # dropout 0, float32
    params = init_params(cfg, jax.random.key(0))
    batch = _batches(cfg, 1, batch=8)[0]
    key = jax.random.key(1)
    full = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, key))(params, batch)
    accum = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, key, 4))(params, batch)
    # Mean of 4 micro-batch means of equal token counts = the full mean; float32 sums in
    # another order (~1e-7 relative).
    assert abs(float(full[0]) - float(accum[0])) < 1e-6
    assert _max_diff(full[1], accum[1]) < 1e-6
    # Through the compiled train step: the same loss; the updated params agree to a few
    # float32 ulps (Adam's first step is lr * g / (|g| + eps): ulp-level differences of
    # near-zero gradient entries are magnified, hence 1e-5).
    loss_1, state_1 = _trajectory(cfg, 1, batch=8)
    loss_4, state_4 = _trajectory(cfg, 1, batch=8, grad_accum=4)
    np.testing.assert_allclose(loss_4, loss_1, atol=1e-6, rtol=0)
    assert _max_diff(state_4.params, state_1.params) < 1e-5


def test_grad_accum_must_divide_batch() -> None:
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by grad_accum=4"):
        TrainConfig(batch_size=6, grad_accum=4)


# --- bf16 mixed precision --------------------------------------------------------------------


def test_bf16_tracks_float32_and_keeps_float32_state(small_vocab_config) -> None:
    cfg = small_vocab_config
    # 20 steps on one repeated batch at lr 3e-3: the loss falls far (memorisation).
    run = dict(lr=3e-3, repeat=True)
    loss_32, _ = _trajectory(cfg, 20, **run)
    loss_16, state = _trajectory(cfg.replace(dtype="bfloat16"), 20, **run)
    # Params and AdamW moments stay float32: bf16 only on activations and matmul inputs.
    leaves = jax.tree.leaves((state.params, adam_state(state.opt_state)))
    assert {str(x.dtype) for x in leaves if x.ndim} == {"float32"}
    # Tolerance. bf16 keeps 8 significant bits: round-to-nearest moves a value by a relative
    # error uniform in [-u, u], u = 2**-8 (std u / sqrt(3)). On the path to the logits,
    # activations are rounded r = 3 (embeddings, their sum) + 11 per block (LayerNorm out,
    # q/k/v, attention weights, context, out_proj, residual, LayerNorm out, ff in, GELU,
    # ff out, residual) + 2 (final LayerNorm, head) times; independent roundings add up to a
    # relative logit error of std sqrt(r / 3) * u. A token's loss moves by at most
    # ||softmax - onehot||_1 <= 2 times the largest logit error, and the batch's B rows are
    # independent (tokens within a row are not), so the mean loss errs with std at most
    # 2 * sqrt(r / 3) * u * max|logit| / sqrt(B). Allowed: 4 of those standard deviations.
    params = init_params(cfg, jax.random.key(0))
    x, _ = _batches(cfg, 1)[0]
    max_logit = float(jnp.max(jnp.abs(_logits(cfg, params, x))))
    r = 3 + 11 * cfg.n_layers + 2
    tol = 4 * 2 * math.sqrt(r / 3) * 2**-8 * max_logit / math.sqrt(x.shape[0])
    err = np.abs(loss_16 - loss_32)
    assert err.max() <= tol, (err, tol)
    # The bound is not vacuous: training moves the loss by far more than it.
    assert loss_32[0] - loss_32[-1] > 10 * tol


# --- padded vocabulary -----------------------------------------------------------------------


def test_vocab_pad_trains_as_unpadded(small_vocab_config) -> None:
    cfg = small_vocab_config  # vocab 97
    padded = cfg.replace(vocab_pad=64)
    assert padded.padded_vocab == 128 and get_preset("gpt2").replace(vocab_pad=64).padded_vocab == (
        50304
    )
    params = init_params(padded, jax.random.key(0))
    assert params["tok_emb"]["embedding"].shape == (128, 32)
    assert params["out_head"]["kernel"].shape == (32, 128)
    x, _ = _batches(cfg, 1, batch=2)[0]
    logits = _logits(padded, params, x)
    assert logits.shape == (2, 16, 97)  # the padded columns never reach the caller
    loss_u, state_u = _trajectory(cfg, 5)
    loss_p, state_p = _trajectory(padded, 5)
    # Padded columns are masked out of the loss: same float32 math on a wider matmul (~1e-7).
    np.testing.assert_allclose(loss_p, loss_u, atol=1e-6, rtol=0)
    head = state_p.params["out_head"]["kernel"]
    assert float(jnp.max(jnp.abs(head[:, 97:]))) == 0.0  # no gradient, no decay: stays zero
    assert _max_diff(fit_vocab(state_p.params, 97), state_u.params) < 1e-5  # Adam: see remat
    # The sampler never picks a padded id, even if their weights were huge.
    loud = {**params, "out_head": {"kernel": head.at[:, 97:].set(1e3)}}
    out = generate(loud, padded, [[1, 2, 3]], max_new_tokens=8)
    assert max(out[0][3:]) < 97


def test_interop_strips_and_adds_vocab_padding(small_vocab_config) -> None:
    pytest.importorskip("torch")
    from jaxgpt.interop import from_book_state_dict, to_book_state_dict

    padded = small_vocab_config.replace(vocab_pad=64, scan_layers=True)
    params = init_params(padded, jax.random.key(0))
    sd = to_book_state_dict(padded, params)
    assert sd["tok_emb.weight"].shape == (97, 32) and sd["out_head.weight"].shape == (97, 32)
    assert "trf_blocks.1.att.W_query.weight" in sd  # unrolled, the book's names
    cfg, back = from_book_state_dict(sd, padded)
    assert cfg == padded and _max_diff(back, params) == 0.0


@pytest.mark.slow  # three compiled programs per run, twice: minutes on 2 loaded cores
def test_train_script_records_switches_and_resumes_in_another_layout(tmp_path, verdict_text):
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(verdict_text[:3000], encoding="utf-8")
    out = tmp_path / "run"
    args = [
        "--model", "tiny", "--data", str(corpus), "--out", str(out), "--batch-size", "4",
        "--eval-freq", "2", "--eval-iter", "1", "--sample-tokens", "2",
    ]  # fmt: skip
    switches = [
        "--dtype", "bfloat16", "--attention", "auto", "--scan-layers", "--remat", "block",
        "--grad-accum", "2", "--vocab-pad", "64",
    ]  # fmt: skip

    def run(*extra: str) -> None:
        cmd = [sys.executable, str(script), *extra]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    run(*args, *switches, "--max-steps", "2")
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["grad_accum"] == 2
    want = {"dtype": "bfloat16", "attention": "auto", "scan_layers": True, "remat": "block"}
    assert {k: saved["model"][k] for k in want} == want and saved["model"]["vocab_pad"] == 64
    # Resume (the run's own settings) unrolled, without remat: the checkpoint on disk is
    # unrolled and loads into either layout.
    run("--out", str(out), "--resume", "--max-steps", "3", "--no-scan-layers", "--remat", "none")
    assert checkpoint.latest_step(out) == 3
    cfg, params = jaxgpt.load(out)
    assert not cfg.scan_layers and "trf_blocks_1" in params
    assert params["tok_emb"]["embedding"].shape == (50304, 32)
