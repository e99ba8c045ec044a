"""GPU and TPU programs checked on the CPU: `jax.export` lowers the train step, the eval step,
greedy decoding and beam search of a tiny model for CUDA and TPU under each accelerator switch
that lowers without the device, and `--attention auto` picks its kernel per target platform.

Lowering (not compiling) is what a CPU can check: a dtype, a shape or a sharding a GPU or TPU
lowering refuses fails here, on every run of the suite. cuDNN attention itself cannot be traced
without the CUDA plugin (JAX asks it for cuDNN's version); `benchmarks/device_check.py` runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxgpt import parallel, sampling
from jaxgpt.config import GPTConfig, TrainConfig, get_preset
from jaxgpt.model import attention_impl
from jaxgpt.optim import make_optimizer
from jaxgpt.step import init_train_state, make_eval_step, make_train_step

TARGETS = ("cuda", "tpu")
BASE = get_preset("tiny").replace(vocab_size=97, drop_rate=0.1)  # ctx 16, emb 32, 2 heads
# name -> (GPTConfig changes, grad_accum): each switch alone, then all of them together.
SWITCHES = {
    "book": ({}, 1),
    "bfloat16": ({"dtype": "bfloat16"}, 1),
    "scan": ({"scan_layers": True}, 1),
    "remat_block": ({"remat": "block"}, 1),
    "remat_dots_scan": ({"remat": "dots", "scan_layers": True}, 1),
    "grad_accum": ({}, 2),
    "vocab_pad": ({"vocab_pad": 64}, 1),
    "fused_attention": ({"attention": "auto", "dtype": "bfloat16", "drop_rate": 0.0}, 1),
    "all": (
        {
            "dtype": "bfloat16",
            "scan_layers": True,
            "remat": "block",
            "vocab_pad": 64,
            "attention": "xla",
            "drop_rate": 0.0,
        },
        2,
    ),  # fmt: skip
}
BATCH = 4


def _setup(changes: dict) -> tuple[GPTConfig, object, object, tuple]:
    cfg = BASE.replace(**changes)
    tx = make_optimizer(TrainConfig(batch_size=BATCH, grad_clip=1.0, min_lr=1e-5), 100)
    state = jax.eval_shape(lambda: init_train_state(cfg, tx, jax.random.key(0)))
    batch = (jax.ShapeDtypeStruct((BATCH, cfg.context_length), jnp.int32),) * 2
    return cfg, tx, state, batch


def _export(fn: object, *args: object, **kwargs: object) -> export.Exported:
    exported = export.export(fn, platforms=TARGETS)(*args, **kwargs)
    assert exported.platforms == TARGETS
    return exported


@pytest.mark.parametrize("name", list(SWITCHES))
def test_train_and_eval_steps_lower_for_gpu_and_tpu(name: str) -> None:
    changes, accum = SWITCHES[name]
    cfg, tx, state, batch = _setup(changes)
    train = _export(make_train_step(cfg, tx, accum), state, batch)
    ev = _export(make_eval_step(cfg), state.params, batch)
    # The programs take what the run gives them: the whole state, and return the new one.
    assert len(train.in_avals) == len(jax.tree.leaves(state)) + 2
    assert len(train.out_avals) == len(jax.tree.leaves(state)) + 3  # + loss, grad_norm, lr
    if cfg.dtype == "bfloat16":  # mixed precision reaches the lowered program
        assert "bf16" in ev.mlir_module()
    assert ev.out_avals[0].shape == () and ev.out_avals[0].dtype == jnp.float32


@pytest.mark.parametrize("name", ["book", "bfloat16", "all"])  # all: scan, vocab_pad too
def test_decode_and_beam_lower_for_gpu_and_tpu(name: str) -> None:
    cfg, _, state, _ = _setup(SWITCHES[name][0])
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12]]
    # 10 + 12 tokens pass the context of 16: the sliding-window phase is lowered too.
    greedy = (12, 0.0, None, None, None, 1, 1.0, None)
    sample = (12, 0.8, 5, 0.9, 3, 1, 1.0, jax.random.key(1))
    beam = (12, 0.0, None, None, 3, 2, 1.0, None)
    for n, temp, top_k, top_p, eos, beams, lp, key in (greedy, sample, beam):
        params, args, key, plan = sampling._call(
            state.params, cfg, prompts, n, key, temperature=temp, top_k=top_k, top_p=top_p,
            eos_id=eos, num_beams=beams, length_penalty=lp,
        )  # fmt: skip
        assert plan.overflow
        out = _export(sampling._generate_padded, params, *args, key, plan=plan)
        assert out.out_avals[0].shape == (plan.batch, plan.buf_len)


@pytest.mark.parametrize("mesh", ["data=2", "data=1,fsdp=2"])
def test_sharded_train_step_lowers_for_gpu_and_tpu(mesh: str) -> None:
    # Every switch at once, on the 2 CPU devices' mesh: shardings must lower for the targets.
    cfg, tx, state, batch = _setup(SWITCHES["all"][0])
    m = parallel.make_mesh(mesh)
    shardings = (parallel.tree_shardings(state, m), parallel.batch_sharding(m))
    exported = _export(make_train_step(cfg, tx, 2, shardings=shardings), state, batch)
    assert exported.nr_devices == 2
    placed = exported.in_shardings_jax(m)  # as lowered for the targets
    assert [s.spec for s in placed[-2:]] == [shardings[1].spec] * 2  # batch rows split
    want = [s.spec for s in jax.tree.leaves(shardings[0])]
    assert [s.spec for s in placed[:-2]] == want  # the state as the FSDP rule places it
    assert any("fsdp" in str(spec) for spec in want) == ("fsdp" in mesh)


def test_auto_attention_choice_per_platform() -> None:
    cfg = BASE.replace(attention="auto", drop_rate=0.0)  # head_dim 16
    bf16 = cfg.replace(dtype="bfloat16")
    assert attention_impl(bf16, True, "cuda") == "cudnn"
    assert [attention_impl(bf16, True, p) for p in ("cpu", "tpu", "rocm")] == ["xla"] * 3
    # cuDNN's rules: 16-bit inputs, head_dim <= 128 and a multiple of 8.
    assert attention_impl(cfg, True, "cuda") == "xla"  # float32
    assert attention_impl(bf16.replace(emb_dim=24, n_heads=2), True, "cuda") == "xla"  # 12
    assert attention_impl(bf16.replace(emb_dim=512, n_heads=2), True, "cuda") == "xla"  # 256
    assert attention_impl(bf16.replace(dtype="float16"), True, "cuda") == "cudnn"
    # Dropout on the attention weights: the book's path everywhere; explicit choices stay.
    dropping = bf16.replace(drop_rate=0.1)
    assert attention_impl(dropping, False, "cuda") == "book"
    assert attention_impl(dropping, True, "cuda") == "cudnn"  # evaluation: no dropout
    assert attention_impl(bf16.replace(attention="xla"), True, "cuda") == "xla"


def test_auto_attention_lowers_per_target_not_per_host() -> None:
    # The same traced eval step, lowered for the CPU and for CUDA: on the CPU it is XLA's
    # attention; a GPU host adds the cuDNN branch for CUDA (checked on a GPU, below).
    cfg, _, state, batch = _setup(SWITCHES["fused_attention"][0])
    exported = export.export(make_eval_step(cfg), platforms=("cpu", "cuda"))(state.params, batch)
    assert "__cudnn$fmha" not in exported.mlir_module()


@pytest.mark.gpu
def test_auto_attention_is_cudnn_in_the_gpu_program() -> None:
    cfg, _, state, batch = _setup(SWITCHES["fused_attention"][0])
    gpu_text = make_eval_step(cfg).lower(state.params, batch).as_text()
    assert "__cudnn$fmha" in gpu_text
    cpu_only = export.export(make_eval_step(cfg), platforms=("cpu", "tpu"))(state.params, batch)
    assert "__cudnn$fmha" not in cpu_only.mlir_module()
