"""One training run's bookkeeping on the host: the run folder (checked, locked, set up by
process 0 between barriers), the starting state (fresh or restored), checkpoint saves, stop
signals and lost processes. `jaxgpt.train.fit` drives it.
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
import numpy as np
import optax

from jaxgpt import checkpoint, data, finetune, freeze, host, metrics, parallel, runguard, tracking
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.model import Params, count_params
from jaxgpt.optim import SkipNonfiniteState
from jaxgpt.step import Batch, TrainState, evaluate, init_train_state

log = logging.getLogger(__name__)
EventFn = Callable[[str, dict[str, Any]], None]
# Settings a resumed run may change: they do not alter the state or the batches it sees.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "eval_freq", "eval_iter", "checkpoint_every", "keep",
     "start_context", "sample_tokens", "out", "cache_dir", "data_url", "compile_cache",
     "compile_ahead", "grad_accum", "mesh", "skip_nonfinite", "heartbeat_timeout",
     "tensorboard", "wandb"}
)  # fmt: skip
# Model settings a resumed run may change: how the same model is computed, not what it is.
MODEL_RESUMABLE_CHANGES = ("attention", "scan_layers", "remat")


@dataclass
class Run:
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
    trainable: freeze.Trainable | None = None  # None: every parameter trains
    source: finetune.Source | None = None  # a fresh fine-tune's weights, until placed
    init_from: dict[str, str] | None = None  # what config.json records of the source
    trackers: tracking.Trackers = field(default_factory=lambda: tracking.Trackers([]))
    ahead: Any = None  # a jaxgpt.ahead.Ahead compiling the run's programs in worker threads

    def sample_prompt(self) -> str:
        """The start context of the epochs' samples (the corpus's own when not given)."""
        prompt = self.tc.start_context
        return data.default_prompt(self.tc.data) if prompt is None else prompt

    def ready(self, program: str) -> None:
        """Wait until `program` ("train", "eval", "sample", "fingerprint"), if it is being
        compiled ahead, is compiled."""
        if self.ahead is not None:
            self.ahead.wait(program)

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


def prepare(
    config: GPTConfig,
    tc: TrainConfig,
    resume: bool,
    on_event: EventFn | None,
    source: finetune.Source | None = None,
) -> Run:
    run_dir = Path(tc.out)
    tracking.check_installed(tc)
    _check_run_dir(run_dir, config, tc, resume)
    parallel.sync("jaxgpt: run folder checked")  # before process 0 writes into it
    trainable = freeze.select(tc.trainable, config)
    mesh = run_mesh(tc)  # a mesh that does not fit fails before the corpus is read or fetched
    splits = data.load_splits(
        tc.data,
        cache_dir=host.cache_dir(tc.cache_dir),
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
    if tc.init_from is None or resume:
        source = None  # a resumed fine-tune reads its checkpoint, never the source
    elif source is None:
        cache = host.cache_dir(tc.cache_dir) / "openai"
        source = finetune.load_source(tc.init_from, cache_dir=cache, n_heads=config.n_heads)
    if source is not None:
        finetune.check_source(source, config)
    return Run(
        config, tc, run_dir, splits, stride, steps_per_epoch, total,
        (on_event or _log_event) if main else _quiet, data.DataPosition(seed=tc.seed),
        mesh=mesh, main=main, report=on_event or _log_event, trainable=trainable,
        source=source, init_from=None if source is None else source.info(),
    )  # fmt: skip


def _quiet(name: str, payload: dict[str, Any]) -> None:
    """Processes other than 0 report nothing."""


def run_mesh(tc: TrainConfig) -> Any:
    """The run's mesh; None for one device without --mesh (the original, unsharded path)."""
    if tc.mesh is None and jax.device_count() == 1:
        return None
    mesh = parallel.make_mesh(tc.mesh)
    parallel.batch_size_check(mesh, tc.batch_size, tc.grad_accum)
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


def start_state(run: Run, tx: optax.GradientTransformation, resume: bool) -> TrainState:
    """Step 0 (fresh weights, or the source's of a fine-tune) or the newest checkpoint."""
    init = _init_fn(run, tx)
    like = jax.eval_shape(init)
    if run.mesh is None:
        # Explicit, so a checkpoint written on another mesh restores onto this one device.
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, like)
    else:
        shardings = state_shardings(run, tx)
    if not resume:
        state = _fresh_state(run, tx, init, shardings)
        if run.main:
            checkpoint.save_run_config(run.dir, run.config, run.tc, init_from=run.init_from)
        parallel.sync("jaxgpt: run folder set up")
        return state
    run.ready("fingerprint")  # the restore checks the checkpoint's fingerprint
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


def state_shardings(run: Run, tx: optax.GradientTransformation) -> Any:
    """The TrainState's shardings on the run's mesh (FSDP rule of `jaxgpt.parallel`)."""
    return parallel.tree_shardings(jax.eval_shape(_init_fn(run, tx)), run.mesh)


def _init_fn(run: Run, tx: optax.GradientTransformation) -> Callable[[], TrainState]:
    """The run's fresh state (random weights) as a function: abstract shapes come from it."""
    key = jax.random.key(run.tc.seed, impl=run.tc.prng_impl)
    return lambda: init_train_state(run.config, tx, key, trainable=run.trainable)


def _fresh_state(
    run: Run, tx: optax.GradientTransformation, init: Callable[[], TrainState], shardings: Any
) -> TrainState:
    """Step 0 on `shardings`: random weights (on a mesh each device computes its own shards),
    or the source's placed shard by shard, with a fresh optimizer state and the same key."""
    if run.source is None:
        return init() if run.mesh is None else parallel.init_sharded(init, shardings)
    params = finetune.place(run.source, run.config, shardings.params)
    run.source = None  # the run holds no host copy of the weights from here on
    key = jax.random.key(run.tc.seed, impl=run.tc.prng_impl)

    def rest(p: Params) -> tuple:
        s = init_train_state(run.config, tx, key, params=p, trainable=run.trainable)
        return s.step, s.opt_state, s.key

    out = (shardings.step, shardings.opt_state, shardings.key)
    step, opt_state, dropout_key = jax.jit(rest, out_shardings=out)(params)
    return TrainState(step=step, params=params, opt_state=opt_state, key=dropout_key)


def check_finite(run: Run, state: TrainState) -> None:
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


def save(run: Run, mngr: Any, state: TrainState) -> None:
    check_finite(run, state)  # never save a halted (diverged) run
    run.ready("fingerprint")
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


def stop_if_signalled(run: Run, mngr: Any, state: TrainState, step: int) -> None:
    """Between steps: after SIGTERM/SIGINT, save the state and raise TrainingInterrupted.
    `step` is the host's count (== state.step): reading the state would wait for the step."""
    signum = None if run.stop is None else run.stop.requested(step)
    if signum is None:
        return
    save_on_interrupt(run, mngr, state)
    where = str(Path(mngr.directory) / str(step))
    raise runguard.TrainingInterrupted(signum, step, where, str(run.dir))


def save_on_interrupt(run: Run, mngr: Any, state: TrainState) -> None:
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
    save(run, mngr, state)


def hold_run_dir(
    held: contextlib.ExitStack, run: Run, tx: optax.GradientTransformation, resume: bool
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
    like = jax.eval_shape(_init_fn(run, tx))
    runguard.check_free_space(run.dir, checkpoint.state_bytes(like), run.tc.keep)


def open_tracking(held: contextlib.ExitStack, run: Run) -> None:
    """Open the trackers the run asks for (process 0; closed with `held`). Call it before
    `start_state`: W&B starts before the run folder is set up."""
    config = {"model": run.config.to_dict(), "train": run.tc.to_dict()}  # as config.json
    run.trackers = held.enter_context(tracking.open_trackers(run.dir, run.tc, config, run.main))


def start_tracking(run: Run, state: TrainState) -> None:
    """Tell the trackers where the run starts, with its config.json (after `start_state`)."""
    if run.trackers.trackers:
        config_text = (run.dir / checkpoint.CONFIG_FILE).read_text(encoding="utf-8")
        run.trackers.start(int(state.step), config_text)


def _peer_watch(run: Run) -> runguard.PeerWatch:
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
    # Any failure may be a peer's loss seen first by a collective (JaxRuntimeError) or by
    # what runs one (Orbax's barriers, a tracker's close); healthy peers end the wait early.
    client, waits_on = parallel.coordination_client(), (Exception,)
    return runguard.PeerWatch(
        client, jax.process_index(), jax.process_count(), timeout, lost, waits_on=waits_on
    )


def start_info(run: Run, state: TrainState, tx: optax.GradientTransformation) -> dict[str, Any]:
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
        **freeze.summary(run.trainable, tx, state.params, state.opt_state),
        "init_from": run.init_from,
    }
