"""Training: TrainState, the jit-compiled train/eval steps, evaluation, and the `fit` loop.

`fit` follows the book's `train_model_simple` (ch. 5.2): evaluate when
`global_step % eval_freq == 0` (global_step counts from 0 after the first update),
print a greedy sample after each epoch, track tokens seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxgpt import checkpoint, data, metrics, parallel, runguard, sampling, tokenizer
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.losses import head_cross_entropy
from jaxgpt.model import GPT, Params, count_params, head_matrix, init_params, precision
from jaxgpt.optim import SkipNonfiniteState, apply_gradients, learning_rate, make_optimizer

log = logging.getLogger(__name__)
Batch = tuple[Any, Any]  # inputs, targets: int32 (batch, seq)
EventFn = Callable[[str, dict[str, Any]], None]
# Settings a resumed run may change: they do not alter the state or the batches it sees.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "eval_freq", "eval_iter", "checkpoint_every", "keep",
     "start_context", "sample_tokens", "out", "cache_dir", "data_url", "compile_cache",
     "grad_accum", "mesh", "skip_nonfinite", "heartbeat_timeout"}
)  # fmt: skip
# Model settings a resumed run may change: how the same model is computed, not what it is.
MODEL_RESUMABLE_CHANGES = ("attention", "scan_layers", "remat")


@struct.dataclass
class TrainState:
    """Everything that changes during training; one pytree, donated to each step."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Params
    opt_state: optax.OptState
    key: jax.Array  # typed PRNG key; dropout uses fold_in(key, step)


def enable_compile_cache(cache_dir: str | Path) -> Path:
    """Keep compiled XLA programs in `cache_dir`/xla across processes (JAX's persistent cache).

    Call it before the first compilation of the process: JAX decides once whether to use
    the cache. Every program is cached, however quick its compile.
    """
    path = Path(cache_dir).expanduser() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def reuse_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: one arena, no mmap, no trimming.

    XLA:CPU allocates each step's buffers afresh (the `small` step's logits alone are
    206 MB); glibc serves blocks over 32 MB with mmap and unmaps them on free, so every step
    page-faulted ~0.9 GB in again (measured: 232k faults and 0.37 s of system time per
    `small` step, 870 -> 630 ms wall). Process-wide and permanent (the heap stays at its peak);
    call it before the first JAX computation, whose worker threads pick their arena then.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt parameters from glibc's malloc.h; mallopt returns 1 on success.
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def init_train_state(
    config: GPTConfig, tx: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """Fresh params from `key` (split into init and dropout keys) and optimizer state."""
    init_key, dropout_key = jax.random.split(key)
    params = init_params(config, init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=dropout_key
    )


def _loss(config: GPTConfig, params: Params, batch: Batch, key: jax.Array | None) -> jax.Array:
    """Mean cross-entropy of a batch; dropout on when `key` is given (the book's calc_loss_batch).

    The head is fused into the loss (`head_cross_entropy`): same value as
    `cross_entropy(GPT.apply(...), y)` to float rounding, without the logits' extra copies.
    """
    x, y = batch  # (batch, seq) each
    rngs = None if key is None else {"dropout": key}
    hidden = GPT(config).apply(
        {"params": params}, x, key is None, rngs=rngs, method=GPT.hidden
    )  # (batch, seq, emb)
    b, s, e = hidden.shape
    return head_cross_entropy(
        hidden.reshape(b * s, e),
        head_matrix(config, params),
        y.reshape(b * s),
        config.tie_embeddings,
        precision(config),
        config.vocab_size,  # masks a padded vocabulary's extra columns
    )


def loss_and_grads(
    config: GPTConfig,
    params: Params,
    batch: Batch,
    key: jax.Array,
    grad_accum: int = 1,
    *,
    gather: Callable[[Params], Params] | None = None,
) -> tuple[jax.Array, Params]:
    """Mean token loss of `batch` and its gradient, over `grad_accum` micro-batches.

    The batch (batch, seq) is cut into grad_accum micro-batches of batch/grad_accum consecutive
    rows; a `lax.scan` sums their losses and gradients and divides by grad_accum. Every
    micro-batch has the same number of tokens, so this is the full batch's mean. Micro-batch i
    draws dropout from fold_in(key, i); grad_accum=1 uses `key` itself (the plain step).
    `gather` maps the parameters before use (FSDP: gather the shards; default identity).
    """
    gather = gather or (lambda p: p)
    if grad_accum == 1:
        return jax.value_and_grad(lambda p: _loss(config, gather(p), batch, key))(params)

    def micro(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        i, mb = xs  # mb: (batch / grad_accum, seq) inputs and targets
        k = jax.random.fold_in(key, i)
        loss, grads = jax.value_and_grad(lambda p: _loss(config, gather(p), mb, k))(params)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    split = lambda a: a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:])  # noqa: E731
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    xs = (jnp.arange(grad_accum), jax.tree.map(split, tuple(batch)))
    (loss, grads), _ = jax.lax.scan(micro, zeros, xs)
    return loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)


def make_train_step(
    config: GPTConfig,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    *,
    shardings: tuple[Any, Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted pure `train_step(state, batch) -> (state, metrics)`; `state` is donated.

    metrics: float32 scalars `loss` (before the update), `grad_norm` (before clipping), `lr`.
    `grad_accum` > 1 averages the gradients of that many micro-batches (`loss_and_grads`).
    `shardings`: (state shardings, batch sharding) from `jaxgpt.parallel`; the compiled step
    then takes and returns the state with exactly those shardings (metrics replicated).
    The loss goes to optimizers that take extra args (`optim.skip_nonfinite` checks it).
    """
    gather = _fsdp_gather(shardings)
    extra_args = isinstance(tx, optax.GradientTransformationExtraArgs)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_key = jax.random.fold_in(state.key, state.step)
        loss, grads = loss_and_grads(
            config, state.params, batch, dropout_key, grad_accum, gather=gather
        )
        kw = {"loss": loss} if extra_args else {}
        params, opt_state = apply_gradients(tx, grads, state.opt_state, state.params, **kw)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": _lr(opt_state)}

    if shardings is not None:
        state_sh, batch_sh = shardings
        out = (state_sh, parallel.replicated(batch_sh.mesh))
        return jax.jit(train_step, donate_argnums=0, in_shardings=shardings, out_shardings=out)
    return jax.jit(train_step, donate_argnums=0)


def mesh_train_step(
    config: GPTConfig, tx: optax.GradientTransformation, key: jax.Array, mesh: str | None
) -> tuple[TrainState, Callable[[TrainState, Batch], tuple[TrainState, dict]], Callable]:
    """(fresh state, jitted step, put) for one device (`mesh` None) or the mesh spec `mesh`
    (e.g. "data=2,fsdp=4"): the state initialised shard by shard, and `put(batch)` placing a
    host (batch, seq) batch the way the step takes it. The benchmarks' and tests' way in."""
    init = lambda: init_train_state(config, tx, key)  # noqa: E731
    if mesh is None:  # today's one-device path: no mesh, no shardings
        return init(), make_train_step(config, tx), lambda b: b
    m = parallel.make_mesh(mesh)
    shardings = parallel.tree_shardings(jax.eval_shape(init), m)
    step = make_train_step(config, tx, shardings=(shardings, parallel.batch_sharding(m)))
    return parallel.init_sharded(init, shardings), step, lambda b: parallel.put_batch(b, m)


def _fsdp_gather(shardings: tuple[Any, Any] | None) -> Callable[[Params], Params]:
    """FSDP: parameters sharded at rest are gathered for the forward and backward pass (XLA
    emits all-gathers, and reduce-scatters for their gradients); identity when unsharded.
    Without it XLA:SPMD mixes batch- and feature-sharded activations and falls back to
    "involuntary full rematerialization" (measured: 2.4x the compile time on 8 CPU devices)."""
    if shardings is None:
        return lambda p: p
    whole = parallel.replicated(shardings[1].mesh)
    return lambda p: jax.lax.with_sharding_constraint(p, jax.tree.map(lambda _: whole, p))


def _lr(opt_state: optax.OptState) -> jax.Array:
    try:
        return learning_rate(opt_state)
    except (AttributeError, IndexError, KeyError, TypeError):  # not a make_optimizer chain
        return jnp.float32(jnp.nan)


def make_eval_step(config: GPTConfig) -> Callable[[Params, Batch], jax.Array]:
    """A jitted `eval_step(params, batch) -> loss` without dropout (the book's calc_loss_batch)."""
    return jax.jit(lambda params, batch: _loss(config, params, batch, None))


def evaluate(
    params: Params,
    batches: Iterable[Batch],
    eval_iter: int | None,
    *,
    eval_step: Callable[[Params, Batch], jax.Array],
) -> float:
    """The book's `calc_loss_loader`: mean of the per-batch losses of the first `eval_iter`
    batches (all when None); nan when there are none. One host sync at the end."""
    losses = []
    for i, batch in enumerate(batches):
        if eval_iter is not None and i >= eval_iter:
            break
        losses.append(eval_step(params, batch))
    return float(jnp.mean(jnp.stack(losses))) if losses else float("nan")


@dataclass
class FitResult:
    """The final state and the metrics rows logged by this call."""

    state: TrainState
    rows: list[dict[str, float]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase, see PhaseTimer


@dataclass
class _Run:
    """Host-side bookkeeping of one fit call."""

    config: GPTConfig
    tc: TrainConfig
    dir: Path
    splits: data.Splits
    stride: int
    steps_per_epoch: int
    total_steps: int
    on_event: EventFn
    position: data.DataPosition
    tokens_seen: int = 0
    skipped: int = 0  # non-finite steps skipped so far (reported when it grows)
    stop: runguard.StopSignals | None = None  # set while fit holds the run folder
    rows: list[dict[str, float]] = field(default_factory=list)
    clock: tuple[float, int] = (0.0, 0)  # (train seconds, tokens_seen) at the last evaluation
    mesh: Any = None  # a jax Mesh; None: one device, unsharded (the original path)
    main: bool = True  # process 0: the one that prints and writes metrics and plots
    report: EventFn = field(default=None)  # type: ignore[assignment]  # every process's errors
    watch: runguard.PeerWatch | None = None  # several processes: notices a lost one

    def put(self, batch: Batch, rows_only: bool = False) -> Batch:
        """A host batch (whole, or with `rows_only` this process's rows of a training batch)
        as arrays laid out on the mesh."""
        if self.mesh is None:
            return batch
        n = self.tc.batch_size if rows_only else None
        return parallel.put_batch(batch, self.mesh, global_rows=n)

    def local_rows(self) -> slice | None:
        """The rows of each training batch this process loads (None: all)."""
        if self.mesh is None:
            return None
        return parallel.local_rows(parallel.batch_sharding(self.mesh), self.tc.batch_size)

    def eval_batches(self, tokens: np.ndarray, drop_last: bool) -> Iterable[Batch]:
        # Evaluation reads the first eval_iter batches in order (the book shuffles its
        # train loader here too; a fixed subset keeps evals comparable and resumable).
        batches = data.batches(
            tokens,
            self.tc.batch_size,
            self.config.context_length,
            self.stride,
            shuffle=False,
            drop_last=drop_last,
        )
        return map(self.put, batches)

    def evaluate(self, params: Params, eval_step: Callable) -> tuple[float, float]:
        n = self.tc.eval_iter
        train = evaluate(params, self.eval_batches(self.splits.train, True), n, eval_step=eval_step)
        val = evaluate(params, self.eval_batches(self.splits.val, False), n, eval_step=eval_step)
        return train, val


def _log_event(name: str, payload: dict[str, Any]) -> None:
    log.info("%s %s", name, payload)


def _prepare(config: GPTConfig, tc: TrainConfig, resume: bool, on_event: EventFn | None) -> _Run:
    run_dir = Path(tc.out)
    _check_run_dir(run_dir, config, tc, resume)
    parallel.sync("jaxgpt: run folder checked")  # before process 0 writes into it
    mesh = _mesh(tc)  # a mesh that does not fit fails before the corpus is read or fetched
    splits = data.load_splits(
        tc.data,
        cache_dir=Path(tc.cache_dir).expanduser(),
        train_ratio=tc.train_ratio,
        base_url=tc.data_url or data.VERDICT_BASE_URL,
    )
    stride = tc.stride or config.context_length
    data.check_splits(splits, config.context_length, tc.batch_size, stride)
    n_windows = len(data.window_starts(len(splits.train), config.context_length, stride))
    steps_per_epoch = data.num_batches(n_windows, tc.batch_size, drop_last=True)
    total = tc.epochs * steps_per_epoch
    total = min(total, tc.max_steps) if tc.max_steps else total
    main = parallel.is_main_process()
    if tc.warmup_steps >= total:
        raise ValueError(
            f"warmup_steps={tc.warmup_steps} is not shorter than the run ({total} steps); "
            f"pass --warmup-steps below {total} (e.g. {total // 10})"
        )
    return _Run(
        config, tc, run_dir, splits, stride, steps_per_epoch, total,
        (on_event or _log_event) if main else _quiet, data.DataPosition(seed=tc.seed),
        mesh=mesh, main=main, report=on_event or _log_event,
    )  # fmt: skip


def _quiet(name: str, payload: dict[str, Any]) -> None:
    """Processes other than 0 report nothing."""


def _mesh(tc: TrainConfig) -> Any:
    """The run's mesh; None for one device without --mesh (the original, unsharded path)."""
    if tc.mesh is None and jax.device_count() == 1:
        return None
    mesh = parallel.make_mesh(tc.mesh)
    parallel.batch_size_check(mesh, tc.batch_size)
    return mesh


def _check_run_dir(run_dir: Path, config: GPTConfig, tc: TrainConfig, resume: bool) -> None:
    """Refuse to mix runs: never overwrite a run's checkpoints, never resume a different run."""
    has_ckpt = checkpoint.latest_step(run_dir) is not None
    has_run = has_ckpt or (run_dir / checkpoint.CONFIG_FILE).exists()
    if not resume and has_run:
        raise ValueError(
            f"run folder {str(run_dir)!r} already holds a run; pass --resume to continue it "
            "or --out NEW_DIR to start another"
        )
    if not resume:
        return
    if not has_ckpt:
        raise ValueError(f"no checkpoint to resume in {str(run_dir)!r}; start without --resume")
    saved_model, saved_tc = checkpoint.load_run_config(run_dir)
    saved_model = saved_model.replace(**{k: getattr(config, k) for k in MODEL_RESUMABLE_CHANGES})
    changed = [k for k, v in tc.to_dict().items() if getattr(saved_tc, k) != v]
    changed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if saved_model != config or changed:
        what = changed or ["model"]
        raise ValueError(
            f"--resume of {str(run_dir)!r} with different settings {what}; resume with the "
            "run's own settings (see its config.json) or start a new run with --out"
        )


def _start_state(run: _Run, tx: optax.GradientTransformation, resume: bool) -> TrainState:
    key = jax.random.key(run.tc.seed, impl=run.tc.prng_impl)
    if run.mesh is None:
        state = init_train_state(run.config, tx, key)
        like = jax.eval_shape(lambda: state)
        # Explicit, so a checkpoint written on another mesh restores onto this one device.
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, like)
    else:
        state, shardings = _sharded_init(run, tx, not resume)
        like = state
    if not resume:
        if run.main:
            checkpoint.save_run_config(run.dir, run.config, run.tc)
        parallel.sync("jaxgpt: run folder set up")
        return state
    with checkpoint.manager(run.dir, keep=run.tc.keep) as mngr:
        state, meta = checkpoint.restore(mngr, like, shardings=shardings)
    run.position = data.DataPosition.from_dict(meta["position"])
    run.tokens_seen = int(meta["tokens_seen"])
    # Every process has read the checkpoint; process 0 alone tidies the folder while the
    # others wait, so no process lists the checkpoints while they move.
    parallel.sync("jaxgpt: checkpoint restored")
    if run.main:
        checkpoint.set_aside_newer(run.dir, int(state.step))  # damaged ones restore passed over
        checkpoint.save_run_config(run.dir, run.config, run.tc)  # records extended epochs/steps
        metrics.truncate_rows(run.dir / metrics.METRICS_FILE, int(state.step))
    parallel.sync("jaxgpt: run folder set up")
    return state


def state_shardings(run: _Run, tx: optax.GradientTransformation) -> Any:
    """The TrainState's shardings on the run's mesh (FSDP rule of `jaxgpt.parallel`)."""
    key = jax.random.key(run.tc.seed, impl=run.tc.prng_impl)
    init = lambda: init_train_state(run.config, tx, key)  # noqa: E731
    return parallel.tree_shardings(jax.eval_shape(init), run.mesh)


def _sharded_init(run: _Run, tx: optax.GradientTransformation, concrete: bool) -> tuple:
    # Fresh: each device computes its own shards. Resumed: only the abstract state is needed.
    key = jax.random.key(run.tc.seed, impl=run.tc.prng_impl)
    init = lambda: init_train_state(run.config, tx, key)  # noqa: E731
    shardings = state_shardings(run, tx)
    return (parallel.init_sharded(init, shardings) if concrete else jax.eval_shape(init)), shardings


def _check_finite(run: _Run, state: TrainState) -> None:
    """Raise NonFiniteError when the optimizer guard has halted (one scalar read: call it
    where the host syncs anyway, before evaluations and saves)."""
    opt = state.opt_state
    if not isinstance(opt, SkipNonfiniteState):
        return
    halted_at, skipped = int(opt.halted_at), int(opt.skipped)
    if halted_at:
        last = checkpoint.latest_step(run.dir)
        where = None if last is None else str(run.dir / checkpoint.CHECKPOINTS / str(last))
        raise runguard.NonFiniteError(halted_at, float(opt.halted_loss), where)
    if skipped > run.skipped:
        log.warning("skipped %d non-finite steps so far (--skip-nonfinite)", skipped)
        run.skipped = skipped


def _save(run: _Run, mngr: Any, state: TrainState) -> None:
    _check_finite(run, state)  # never save a halted (diverged) run
    meta = {"position": run.position.to_dict(), "tokens_seen": run.tokens_seen}
    step = int(state.step)
    try:
        checkpoint.save(mngr, state, meta)
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports ENOSPC as ValueError
        newest = [s for s in checkpoint.list_steps(run.dir) if s != step]
        raise runguard.CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {mngr.directory} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); older "
            f"checkpoints are intact (newest: {max(newest, default=None)}); free disk space "
            "and --resume"
        ) from e
    run.on_event("checkpoint", {"step": step, "dir": str(mngr.directory)})


def _stop_if_signalled(run: _Run, mngr: Any, state: TrainState) -> None:
    """Between steps: after SIGTERM/SIGINT, save the state and raise TrainingInterrupted."""
    step = int(state.step)
    signum = None if run.stop is None else run.stop.requested(step)
    if signum is None:
        return
    _save_on_interrupt(run, mngr, state)
    where = str(Path(mngr.directory) / str(step))
    raise runguard.TrainingInterrupted(signum, step, where, str(run.dir))


def _save_on_interrupt(run: _Run, mngr: Any, state: TrainState) -> None:
    # Interrupted between steps, the position already points at the next batch. Interrupted
    # inside a step, the donated state is gone: keep the last periodic checkpoint instead.
    if any(x.is_deleted() for x in jax.tree.leaves(state.params)):
        log.warning("interrupted inside a step; newest checkpoint is the last periodic one")
        return
    # Each step consumes one batch, so the step fixes the position even if the interrupt
    # came after a batch was drawn but before its step ran.
    step = int(state.step)
    run.position = data.DataPosition(
        epoch=step // run.steps_per_epoch, batch=step % run.steps_per_epoch, seed=run.tc.seed
    )
    run.tokens_seen = step * run.tc.batch_size * run.config.context_length
    _save(run, mngr, state)


def _sample(run: _Run, params: Params, epoch: int) -> None:
    prompt = run.tc.start_context
    ids = tokenizer.encode(data.default_prompt(run.tc.data) if prompt is None else prompt)
    params = params if run.mesh is None else parallel.to_local(params, run.mesh)
    out = sampling.generate(params, run.config, [ids], max_new_tokens=run.tc.sample_tokens)
    text = tokenizer.decode(out[0]).replace("\n", " ")  # the book's compact print
    run.on_event("sample", {"epoch": epoch + 1, "text": text})


def _show_step(run: _Run, m: dict, timer: metrics.PhaseTimer, bar: metrics.Progress) -> None:
    """Refresh the bar with a finished step's loss and the training tokens/s since the last
    evaluation (train time only, compilation excluded). Reading the loss waits for that step."""
    loss = float(m["loss"])
    tokens, tok_s = _train_tokens_per_sec(run, timer)
    enough = tokens > 2 * run.tc.batch_size * run.config.context_length  # else: keep the last
    bar.show(loss, tok_s if enough else None, timer.seconds["compile"])


def _train_tokens_per_sec(run: _Run, timer: metrics.PhaseTimer) -> tuple[int, float]:
    """(tokens, tokens/s) trained since the last evaluation, over train time only."""
    tick, tick_tokens = run.clock
    tokens, train_s = run.tokens_seen - tick_tokens, timer.seconds["train"] - tick
    return tokens, tokens / train_s if train_s > 0 else float("nan")


def _eval_and_show(
    run: _Run, state: TrainState, m: dict, eval_step: Callable, timer: metrics.PhaseTimer
) -> None:
    _check_finite(run, state)
    _, tok_s = _train_tokens_per_sec(run, timer)
    with timer.phase("eval"):
        _eval_row(run, state, m, eval_step, tok_s)
    run.clock = (timer.seconds["train"], run.tokens_seen)


def _eval_row(run: _Run, state: TrainState, m: dict, eval_step: Callable, tok_s: float) -> dict:
    train_loss, val_loss = run.evaluate(state.params, eval_step)
    step = int(state.step)
    row = metrics.make_row(
        step=step,
        epoch=run.position.epoch + run.position.batch / run.steps_per_epoch,
        tokens_seen=run.tokens_seen,
        train_loss=train_loss,
        val_loss=val_loss,
        lr=float(m["lr"]),
        grad_norm=float(m["grad_norm"]),
        tokens_per_sec=tok_s,
    )
    if run.main:
        metrics.append_row(run.dir / metrics.METRICS_FILE, row)
    run.rows.append(row)
    run.on_event("eval", {**row, "epoch_index": run.position.epoch + 1, "global_step": step - 1})
    return row


def fit(
    config: GPTConfig,
    tc: TrainConfig,
    *,
    resume: bool = False,
    on_event: EventFn | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `config` with `tc` into the run folder `tc.out`, as the book's `train_model_simple`.

    Evaluates after steps 1, 1 + eval_freq, ... (the book's schedule) and after the last step.

    Writes `config.json`, `metrics.jsonl` (a row per evaluation), `checkpoints/` (every
    `checkpoint_every` steps, at the end, and on Ctrl-C) and `plots/`. `on_event(name,
    payload)` receives "start", "untrained", "eval", "sample", "checkpoint", "done" (with
    "times": wall seconds per phase, compilation split out); the default logs them.

    A lock on the run folder refuses a second run into it. SIGTERM/SIGINT finish the
    current step, save it and raise `TrainingInterrupted` (a second signal: `SaveAborted`).

    Raises:
      ValueError: bad data or run folder (the run folder is never deleted or overwritten).
      runguard.NonFiniteError: non-finite loss/gradients past `tc.skip_nonfinite`.
      runguard.TrainingInterrupted: after a stop signal, with the checkpoint saved.
      runguard.CheckpointWriteError: a save failed (disk full...); older ones are intact.
    """
    timer = metrics.PhaseTimer()
    with timer, contextlib.ExitStack() as held:
        with timer.phase("setup"):
            run = _prepare(config, tc, resume, on_event)
            tx = make_optimizer(tc, run.total_steps)
            _hold_run_dir(held, run, tx, resume)
            state = _start_state(run, tx, resume)
            shardings = None
            if run.mesh is not None:
                shardings = (state_shardings(run, tx), parallel.batch_sharding(run.mesh))
            train_step = make_train_step(config, tx, tc.grad_accum, shardings=shardings)
            eval_step = make_eval_step(config)
        run.on_event("start", _start_info(run, state))
        if int(state.step) == 0:
            with timer.phase("eval"):
                train_loss, val_loss = run.evaluate(state.params, eval_step)
            run.on_event("untrained", {"train_loss": train_loss, "val_loss": val_loss})
        state, step = _train_loop(run, state, train_step, eval_step, timer, progress)
        with timer.phase("plots"):
            plots = metrics.write_plots(run.dir) if run.main else []
        parallel.sync("jaxgpt: fit done")  # no process leaves while another might miss it
    times = timer.summary()
    run.on_event(
        "done",
        {"step": step, "run_dir": str(run.dir), "plots": [str(p) for p in plots], "times": times},
    )
    return FitResult(state, run.rows, times)


def _hold_run_dir(
    held: contextlib.ExitStack, run: _Run, tx: optax.GradientTransformation, resume: bool
) -> None:
    """Lock the run folder and catch stop signals for the rest of `fit`; then check the
    folder again (no other run can write it now) and the free space for one checkpoint."""
    several = jax.process_count() > 1
    run.stop = held.enter_context(runguard.StopSignals(agreed=several))
    if several:
        run.watch = held.enter_context(_peer_watch(run))
    if not run.main:  # the processes of one run share its folder; process 0 owns it
        return
    held.enter_context(runguard.RunLock(run.dir))
    _check_run_dir(run.dir, run.config, run.tc, resume)
    like = jax.eval_shape(lambda: init_train_state(run.config, tx, jax.random.key(0)))
    runguard.check_free_space(run.dir, checkpoint.state_bytes(like), run.tc.keep)


def _peer_watch(run: _Run) -> runguard.PeerWatch:
    """Watch the other processes; when one is lost, report it and end this process with
    `runguard.PEER_LOST_EXIT` (its collectives can never finish)."""

    def lost(what: str, why: str) -> None:
        last = checkpoint.list_steps(run.dir)
        run.report(
            "lost",
            {
                "what": what,
                "why": why,
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "checkpoint": str(run.dir / checkpoint.CHECKPOINTS / str(last[-1]))
                if last
                else None,
                "run_dir": str(run.dir),
            },
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(runguard.PEER_LOST_EXIT)  # skips JAX's shutdown barrier, which would wait

    # JAX's service takes a silent process for dead between half and all of heartbeat_timeout
    # after its last beat (measured: 11-15 s of 20, 90 s of 100) and then aborts the others;
    # a quarter of it leaves the clean stop well ahead.
    timeout = run.tc.heartbeat_timeout / 4
    client, waits_on = parallel.coordination_client(), (jax.errors.JaxRuntimeError,)
    return runguard.PeerWatch(
        client, jax.process_index(), jax.process_count(), timeout, lost, waits_on=waits_on
    )


def _train_loop(
    run: _Run,
    state: TrainState,
    train_step: Callable,
    eval_step: Callable,
    timer: metrics.PhaseTimer,
    progress: bool,
) -> tuple[TrainState, int]:
    """The book's epoch loop. Steps are dispatched asynchronously: the host reads a step's
    loss only after the next step is queued, so the device never waits for the host, and the
    next batch is cut while the current step runs."""
    tc, config = run.tc, run.config
    bar = metrics.Progress(run.total_steps, int(state.step), enabled=progress and run.main)
    mngr = checkpoint.manager(run.dir, keep=tc.keep)
    step, m, shown = int(state.step), None, None
    run.clock = (timer.seconds["train"], run.tokens_seen)
    try:
        _stop_if_signalled(run, mngr, state)  # a signal during setup or the first evaluation
        while step < run.total_steps and run.position.epoch < tc.epochs:
            epoch = run.position.epoch
            for batch in data.batches(
                run.splits.train, tc.batch_size, config.context_length, run.stride,
                seed=tc.seed, shuffle=True, drop_last=True, position=run.position,
                rows=run.local_rows(), sampling=tc.sampling,
            ):  # fmt: skip
                with timer.phase("train"):
                    batch = run.put(batch, rows_only=True)
                    state, m = train_step(state, batch)
                    step += 1
                    run.tokens_seen += batch[0].size
                    if shown is not None:
                        _show_step(run, shown, timer, bar)  # the previous step's loss
                    bar.update()
                    shown = m
                    pause = (step - 1) % tc.eval_freq == 0 or step % tc.checkpoint_every == 0
                    if pause or step >= run.total_steps:
                        jax.block_until_ready(m)  # the step's compute counts as training
                if (step - 1) % tc.eval_freq == 0:  # the book's global_step % eval_freq == 0
                    _eval_and_show(run, state, m, eval_step, timer)
                if step % tc.checkpoint_every == 0 and step < run.total_steps:
                    with timer.phase("checkpoint"):  # (the last step: after its final eval)
                        _save(run, mngr, state)
                if step >= run.total_steps:
                    break
                _stop_if_signalled(run, mngr, state)
            with timer.phase("train"):
                jax.block_until_ready(m)  # queued steps are training time, not sampling time
            with timer.phase("sample"):
                _sample(run, state.params, epoch)
        if m is not None:
            _show_step(run, m, timer, bar)
            if (step - 1) % tc.eval_freq:
                _eval_and_show(run, state, m, eval_step, timer)  # also evaluate the final state
        with timer.phase("checkpoint"):
            _save(run, mngr, state)
    except KeyboardInterrupt:
        _save_on_interrupt(run, mngr, state)
        raise
    finally:
        bar.close()
        mngr.close()
    return state, step


def _start_info(run: _Run, state: TrainState) -> dict[str, Any]:
    return {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "train_tokens": len(run.splits.train),
        "val_tokens": len(run.splits.val),
        # What the book prints: tokens in one pass over each loader (train drops the last
        # partial batch, validation keeps it).
        "train_loader_tokens": run.steps_per_epoch * run.tc.batch_size * run.config.context_length,
        "val_loader_tokens": len(
            data.window_starts(len(run.splits.val), run.config.context_length, run.stride)
        )
        * run.config.context_length,
        "params": count_params(state.params),
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "step": int(state.step),
        "run_dir": str(run.dir),
        "mesh": None if run.mesh is None else dict(run.mesh.shape),
        "processes": jax.process_count(),
    }
