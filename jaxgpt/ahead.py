"""Compile a run's programs ahead of time, in worker threads, while the main thread reads the
corpus, initialises the model and evaluates it (XLA compiles without holding the GIL).

A program is warmed by `jitted.lower(*abstract_args).compile()`: JAX keeps that lowering and
its executable in the jitted function's own caches, so the run's later call with arguments of
the same shapes, dtypes and placement compiles nothing, and runs the very same executable.
Waiting for a program still compiling counts as compilation in the run's `PhaseTimer` (what
the run waited for). A warm-up that fails is dropped: the run's own call then compiles, and
reports any error, exactly as without compiling ahead.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import optax

from jaxgpt import checkpoint, data, metrics, parallel, sampling, tokenizer
from jaxgpt.step import init_train_state

if TYPE_CHECKING:
    from jaxgpt.run import Run

log = logging.getLogger(__name__)


class Ahead:
    """Worker threads compiling named programs; `wait(name)` before a program's first use.

    Disabled (`enabled=False`), `submit` and `wait` do nothing: each program compiles when
    first called, on the calling thread.
    """

    def __init__(
        self,
        timer: metrics.PhaseTimer | None = None,
        *,
        enabled: bool = True,
        workers: int | None = None,
    ) -> None:
        # Default: one worker per core beyond the main thread's, at most two. On 2 cores one
        # worker compiles the programs in the order they are needed, so the train step does
        # not share its core with the sampler's compile while the main thread initialises.
        workers = workers or max(1, min(2, (os.cpu_count() or 2) - 1))
        self.enabled = enabled
        self._timer = timer
        self._futures: dict[str, list[concurrent.futures.Future]] = {}
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(workers, "jaxgpt-compile") if enabled else None
        )

    def submit(self, name: str, warm: Callable[[], Any]) -> None:
        """Run `warm()` (lowering and compiling a program) in a worker, after those before."""
        if self._pool is None:
            return
        self._futures.setdefault(name, []).append(self._pool.submit(_quietly, name, warm))

    def wait(self, name: str) -> None:
        """Block until every warm-up submitted as `name` has finished."""
        futures = self._futures.pop(name, [])
        if not futures:
            return
        start = time.time()
        concurrent.futures.wait(futures)
        if self._timer is not None:
            self._timer.add_wait(start, time.time())

    def close(self) -> None:
        """Drop the warm-ups not started; those compiling finish in the background."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quietly(name: str, warm: Callable[[], Any]) -> None:
    try:
        warm()
    except Exception as e:  # the run's own call compiles instead and raises what it must
        log.debug("compiling %s ahead failed: %s: %s", name, type(e).__name__, e)


def lowered(jitted: Any, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """A warm-up: lower and compile `jitted` for (abstract) `args`."""
    return lambda: jitted.lower(*args, **kwargs).compile()


def abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), each with its sharding from
    the matching tree `shardings`, or with none (an array not committed to a device)."""
    shapes = jax.eval_shape(lambda t: t, tree)
    if shardings is None:
        return shapes
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s, weak_type=x.weak_type),
        shapes,
        shardings,
    )


def warm_fit(
    ahead: Ahead,
    run: Run,
    tx: optax.GradientTransformation,
    steps: tuple[Callable, Callable],
    resume: bool,
    shardings: tuple[Any, Any] | None,
) -> None:
    """Submit the programs `jaxgpt.train.fit` runs, in the order it first needs them: the
    checkpoint fingerprint (a resume checks the newest checkpoint), the evaluation step (the
    untrained evaluation), the train step, the epoch's sample, the fingerprint (first save).

    `steps`: (train_step, eval_step); `shardings`: (state, batch) shardings on the run's mesh.
    """
    if not ahead.enabled:
        return
    train_step, eval_step = steps
    key = jax.random.key(run.tc.seed, impl=run.tc.prng_impl)
    like = jax.eval_shape(lambda: init_train_state(run.config, tx, key, trainable=run.trainable))
    # Where the state's arrays will live: fresh random weights are not committed to a device;
    # a restored state, or a fine-tune's source weights, are placed on device 0; on a mesh,
    # the FSDP shardings.
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    committed = resume or run.source is not None
    if shardings is not None:
        placed = shardings[0]
    else:
        placed = _same(like, one) if committed else None
    state = abstract(like, placed)
    ring = one if committed and shardings is None else placed  # the fingerprint's placement
    fingerprint = lambda: checkpoint.precompile_fingerprint(state, ring)  # noqa: E731
    if resume:
        ahead.submit("fingerprint", fingerprint)
    for rows in _eval_rows(run):
        ahead.submit("eval", lowered(eval_step, state.params, _batch(run, rows)))
    ahead.submit("train", lowered(train_step, state, _batch(run, run.tc.batch_size)))
    if run.tc.sample_tokens:
        # A mesh samples on one device (`parallel.to_local`), as a resumed run does.
        local = None if shardings is None and not committed else one
        params = abstract(like.params, None if local is None else _same(like.params, local))
        ids = tokenizer.encode(run.sample_prompt())
        n = run.tc.sample_tokens
        ahead.submit("sample", lambda: sampling.precompile(params, run.config, [ids], n))
    if not resume:
        ahead.submit("fingerprint", fingerprint)


def _same(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda _: sharding, tree)


def _eval_rows(run: Run) -> list[int]:
    """Batch sizes the evaluations take: full batches, and the validation split's partial last
    batch when it is among the first eval_iter."""
    t, b = run.config.context_length, run.tc.batch_size
    n = len(data.window_starts(len(run.splits.val), t, run.stride))
    last = n % b
    return [b, last] if last and -(-n // b) <= run.tc.eval_iter else [b]


def _batch(run: Run, rows: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract (inputs, targets) int32 (rows, seq), placed as `Run.put` places them."""
    shape = (rows, run.config.context_length)
    sharding = None
    if run.mesh is not None:
        ways = parallel.batch_ways(run.mesh)
        sharding = (
            parallel.batch_sharding(run.mesh) if rows % ways == 0 else parallel.replicated(run.mesh)
        )
    x = jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=sharding)
    return x, x
