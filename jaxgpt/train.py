"""The `fit` loop: the book's `train_model_simple` (ch. 5.2) over the pure steps of
`jaxgpt.step` and the run bookkeeping of `jaxgpt.run`.

Evaluate when `global_step % eval_freq == 0` (global_step counts from 0 after the first
update), print a greedy sample after each epoch, track tokens seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import jax

from jaxgpt import checkpoint, data, host, metrics, parallel, sampling, tokenizer
from jaxgpt.ahead import Ahead, warm_fit
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.finetune import Source
from jaxgpt.model import Params
from jaxgpt.optim import make_optimizer
from jaxgpt.run import (
    EventFn,
    Run,
    check_finite,
    hold_run_dir,
    open_tracking,
    prepare,
    save,
    save_on_interrupt,
    start_info,
    start_state,
    start_tracking,
    state_shardings,
    stop_if_signalled,
)
from jaxgpt.step import TrainState, make_eval_step, make_train_step


@dataclass
class FitResult:
    """The final state and the metrics rows logged by this call."""

    state: TrainState
    rows: list[dict[str, float]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase, see PhaseTimer
    compile: dict = field(default_factory=dict)  # all compilation: PhaseTimer.compile_report


def _sample(run: Run, params: Params, epoch: int) -> None:
    ids = tokenizer.encode(run.sample_prompt())
    params = params if run.mesh is None else parallel.to_local(params, run.mesh)
    run.ready("sample")
    out = sampling.generate(params, run.config, [ids], max_new_tokens=run.tc.sample_tokens)
    text = tokenizer.decode(out[0]).replace("\n", " ")  # the book's compact print
    run.on_event("sample", {"epoch": epoch + 1, "text": text})


def _finish(queued: tuple[dict, int] | None) -> tuple[float, int] | None:
    """(loss, tokens seen) of a queued step's (metrics, tokens seen): reading the loss waits
    for that step, so call it inside the train phase."""
    return None if queued is None else (float(queued[0]["loss"]), queued[1])


def _show_step(
    run: Run, done: tuple[float, int] | None, timer: metrics.PhaseTimer, bar: metrics.Progress
) -> None:
    """Refresh the bar with a finished step's (loss, tokens seen) and the training tokens/s
    since the last evaluation: tokens of finished steps only, over the train time that waited
    for them (compilation excluded). Call it outside the train phase, which is then counted."""
    if done is None:
        return
    loss, tokens_done = done
    tokens, tok_s = _train_tokens_per_sec(run, timer, tokens_done)
    enough = tokens > 2 * run.tc.batch_size * run.config.context_length  # else: keep the last
    bar.show(loss, tok_s if enough else None, timer.seconds["compile"])


def _train_tokens_per_sec(
    run: Run, timer: metrics.PhaseTimer, tokens_done: int | None = None
) -> tuple[int, float]:
    """(tokens, tokens/s) trained since the last evaluation up to `tokens_done` (default: every
    step so far, all finished), over train time only."""
    tick, tick_tokens = run.clock
    done = run.tokens_seen if tokens_done is None else tokens_done
    tokens, train_s = done - tick_tokens, timer.seconds["train"] - tick
    return tokens, tokens / train_s if train_s > 0 else float("nan")


def _eval_and_show(
    run: Run, state: TrainState, m: dict, eval_step: Callable, timer: metrics.PhaseTimer
) -> None:
    check_finite(run, state)
    _, tok_s = _train_tokens_per_sec(run, timer)
    with timer.phase("eval"):
        _eval_row(run, state, m, eval_step, tok_s)
    run.clock = (timer.seconds["train"], run.tokens_seen)


def _eval_row(run: Run, state: TrainState, m: dict, eval_step: Callable, tok_s: float) -> dict:
    run.ready("eval")
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
        run.trackers.log(row)  # TensorBoard, W&B: the same row at the same step
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
    source: Source | None = None,
) -> FitResult:
    """Train `config` with `tc` into the run folder `tc.out`, as the book's `train_model_simple`.

    Evaluates after steps 1, 1 + eval_freq, ... (the book's schedule) and after the last step.

    Writes `config.json`, `metrics.jsonl` (a row per evaluation), `checkpoints/` (every
    `checkpoint_every` steps, at the end, and on Ctrl-C) and `plots/`; the same rows go to
    TensorBoard and W&B when `tc.tensorboard` / `tc.wandb` ask (`jaxgpt.tracking`). `on_event(name,
    payload)` receives "start", "untrained", "eval", "sample", "checkpoint", "done" (with
    "times": wall seconds per phase, whose "compile" is the compilation the run waited for,
    and "compile": all compilation, how much of it overlapped other work, seconds per
    program); the default logs them.

    `tc.init_from` starts from pretrained weights (read here unless `source`, from
    `jaxgpt.finetune.load_source`, holds them; `config` must fit them: see
    `finetune.model_config`); `tc.trainable` trains only the params it matches.

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
            run = prepare(config, tc, resume, on_event, source)
            tx = make_optimizer(tc, run.total_steps)
            hold_run_dir(held, run, tx, resume)
            open_tracking(held, run)
            shardings = None
            if run.mesh is not None:
                shardings = (state_shardings(run, tx), parallel.batch_sharding(run.mesh))
            train_step = make_train_step(
                config, tx, tc.grad_accum, shardings=shardings, trainable=run.trainable
            )
            eval_step = make_eval_step(config)
            run.ahead = held.enter_context(Ahead(timer, enabled=tc.compile_ahead))
            warm_fit(run.ahead, run, tx, (train_step, eval_step), resume, shardings)
            state = start_state(run, tx, resume)
            start_tracking(run, state)
            info = start_info(run, state, tx)  # reads the state: waits for the initialisation
        run.on_event("start", info)
        if int(state.step) == 0:
            run.ready("eval")
            with timer.phase("eval"):
                train_loss, val_loss = run.evaluate(state.params, eval_step)
            run.on_event("untrained", {"train_loss": train_loss, "val_loss": val_loss})
        state, step = _train_loop(run, state, train_step, eval_step, timer, progress)
        with timer.phase("plots"):
            plots = metrics.write_plots(run.dir) if run.main else []
        parallel.sync("jaxgpt: fit done")  # no process leaves while another might miss it
    times, compiled = timer.summary(), timer.compile_report()
    done = {"step": step, "run_dir": str(run.dir), "plots": [str(p) for p in plots]}
    run.on_event("done", {**done, "times": times, "compile": compiled})
    return FitResult(state, run.rows, times, compiled)


def _train_loop(
    run: Run,
    state: TrainState,
    train_step: Callable,
    eval_step: Callable,
    timer: metrics.PhaseTimer,
    progress: bool,
) -> tuple[TrainState, int]:
    """The book's epoch loop. Steps are dispatched asynchronously: the host reads a step's
    loss only after the next step is queued, so the device never waits for the host, and the
    next batch is cut while the current step runs. Between steps the host reads nothing from
    the device (the step count is kept on the host), so waiting for steps is train time.

    On CPU one step at a time: XLA:CPU allocates a step's buffers when it is dispatched, so a
    step queued behind a running one holds a second set (gpt2, batch 2: 2 x 7.4 GiB). The
    wait (for the state: the metrics are ready before the step has freed its buffers) comes
    after the next batch is cut; it cost the `small` step nothing measurable. Then the free
    host heap is bounded (`host.trim_between_steps`, under reuse_host_memory).
    """
    tc, config = run.tc, run.config
    one_at_a_time = jax.default_backend() == "cpu"
    bar = metrics.Progress(run.total_steps, int(state.step), enabled=progress and run.main)
    mngr = checkpoint.manager(run.dir, keep=tc.keep)
    step, m, queued = int(state.step), None, None  # queued: (metrics, tokens seen) of a step
    run.clock = (timer.seconds["train"], run.tokens_seen)
    try:
        stop_if_signalled(run, mngr, state, step)  # a signal during setup or the first eval
        while step < run.total_steps and run.position.epoch < tc.epochs:
            epoch = run.position.epoch
            for batch in data.batches(
                run.splits.train, tc.batch_size, config.context_length, run.stride,
                seed=tc.seed, shuffle=True, drop_last=True, position=run.position,
                rows=run.local_rows(), sampling=tc.sampling,
            ):  # fmt: skip
                run.ready("train")
                with timer.phase("train"):
                    batch = run.put(batch, rows_only=True)
                    if one_at_a_time and m is not None:  # the state: ready after the metrics
                        jax.block_until_ready(state)  # and once the step freed its buffers
                        host.trim_between_steps()
                    state, m = train_step(state, batch)
                    step += 1
                    done = _finish(queued)  # the previous step, while this one is queued
                    run.tokens_seen += batch[0].size
                    queued = (m, run.tokens_seen)
                    bar.update()
                    pause = (step - 1) % tc.eval_freq == 0 or step % tc.checkpoint_every == 0
                    if pause or step >= run.total_steps:
                        jax.block_until_ready(m)  # the step's compute counts as training
                _show_step(run, done, timer, bar)
                if (step - 1) % tc.eval_freq == 0:  # the book's global_step % eval_freq == 0
                    _eval_and_show(run, state, m, eval_step, timer)
                if step % tc.checkpoint_every == 0 and step < run.total_steps:
                    with timer.phase("checkpoint"):  # (the last step: after its final eval)
                        save(run, mngr, state)
                if step >= run.total_steps:
                    break
                stop_if_signalled(run, mngr, state, step)
            with timer.phase("train"):
                jax.block_until_ready(m)  # queued steps are training time, not sampling time
            with timer.phase("sample"):
                _sample(run, state.params, epoch)
        if m is not None:
            _show_step(run, _finish(queued), timer, bar)
            if (step - 1) % tc.eval_freq:
                _eval_and_show(run, state, m, eval_step, timer)  # also evaluate the final state
        with timer.phase("checkpoint"):
            save(run, mngr, state)
    except KeyboardInterrupt:
        save_on_interrupt(run, mngr, state)
        raise
    finally:
        bar.close()
        mngr.close()
    return state, step
