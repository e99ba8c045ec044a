"""The train state and the pure, jit-compiled steps: `TrainState`, `init_train_state`,
`loss_and_grads`, `make_train_step` (also on a mesh), `make_eval_step` and `evaluate`.

Nothing here touches files or the console; `jaxgpt.train.fit` drives these steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxgpt import parallel
from jaxgpt.config import GPTConfig
from jaxgpt.freeze import Trainable
from jaxgpt.losses import head_cross_entropy
from jaxgpt.model import GPT, Params, head_matrix, init_params, precision
from jaxgpt.optim import apply_gradients, learning_rate

Batch = tuple[Any, Any]  # inputs, targets: int32 (batch, seq)


@struct.dataclass
class TrainState:
    """Everything that changes during training; one pytree, donated to each step."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Params
    opt_state: optax.OptState
    key: jax.Array  # typed PRNG key; dropout uses fold_in(key, step)


def init_train_state(
    config: GPTConfig,
    tx: optax.GradientTransformation,
    key: jax.Array,
    *,
    params: Params | None = None,
    trainable: Trainable | None = None,
) -> TrainState:
    """Step 0: fresh params from `key` (split into init and dropout keys), or the given
    `params` (a fine-tune), and a fresh optimizer state over the `trainable` view (all params
    when None)."""
    init_key, dropout_key = jax.random.split(key)
    params = init_params(config, init_key) if params is None else params
    view = params if trainable is None else trainable.view(params)
    # One program for the optimizer's zeros, not one per leaf shape (when not traced already).
    opt_state = tx.init(view) if isinstance(key, jax.core.Tracer) else jax.jit(tx.init)(view)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, key=dropout_key
    )


def _loss(
    config: GPTConfig,
    params: Params,
    batch: Batch,
    key: jax.Array | None,
    fsdp: parallel.FSDP | None = None,
) -> jax.Array:
    """Mean cross-entropy of a batch; dropout on when `key` is given (the book's calc_loss_batch).

    The head is fused into the loss (`head_cross_entropy`): same value as
    `cross_entropy(GPT.apply(...), y)` to float rounding, without the logits' extra copies.
    Under `fsdp` the blocks gather their own parameters one at a time, the embeddings are
    looked up shard by shard, and the head matrix is gathered here, for the loss only.
    """
    x, y = batch  # (batch, seq) each
    rngs = None if key is None else {"dropout": key}
    hidden = GPT(config, fsdp).apply(
        {"params": params}, x, key is None, rngs=rngs, method=GPT.hidden
    )  # (batch, seq, emb)
    head = head_matrix(config, params)
    head = head if fsdp is None else fsdp.gather(head)  # gathered once, for the loss
    b, s, e = hidden.shape
    return head_cross_entropy(
        hidden.reshape(b * s, e),
        head,
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
    merge: Callable[[Params], Params] | None = None,
    fsdp: parallel.FSDP | None = None,
) -> tuple[jax.Array, Params]:
    """Mean token loss of `batch` and its gradient, over `grad_accum` micro-batches.

    The batch (batch, seq) is cut into grad_accum micro-batches of batch/grad_accum consecutive
    rows; a `lax.scan` sums their losses and gradients and divides by grad_accum. Every
    micro-batch has the same number of tokens, so this is the full batch's mean. Micro-batch i
    draws dropout from fold_in(key, i); grad_accum=1 uses `key` itself (the plain step).
    `merge` makes the model's params of the differentiated ones (a fine-tune's frozen params
    merged in; default identity). `fsdp`: params sharded at rest, gathered where used.
    """
    merge = merge or (lambda p: p)
    if grad_accum == 1:
        return jax.value_and_grad(lambda p: _loss(config, merge(p), batch, key, fsdp))(params)

    def micro(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        i, mb = xs  # mb: (batch / grad_accum, seq) inputs and targets
        k = jax.random.fold_in(key, i)
        loss, grads = jax.value_and_grad(lambda p: _loss(config, merge(p), mb, k, fsdp))(params)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    def split(a: jax.Array) -> jax.Array:  # (batch, seq) -> (grad_accum, batch/grad_accum, seq)
        micro_batches = a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:])
        # On a mesh each micro-batch is spread over every device (a tiny int32 all-to-all).
        return micro_batches if fsdp is None else fsdp.batch(micro_batches, axis=1)

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
    trainable: Trainable | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted pure `train_step(state, batch) -> (state, metrics)`; `state` is donated.

    metrics: float32 scalars `loss` (before the update), `grad_norm` (before clipping), `lr`.
    `grad_accum` > 1 averages the gradients of that many micro-batches (`loss_and_grads`).
    `shardings`: (state shardings, batch sharding) from `jaxgpt.parallel`; the compiled step
    then takes and returns the state with exactly those shardings (metrics replicated).
    `trainable`: only its view is differentiated and updated (the state's optimizer state is
    over the view); frozen params leave the step as they came in.
    The loss goes to optimizers that take extra args (`optim.skip_nonfinite` checks it).
    """
    fsdp = _fsdp(shardings)
    extra_args = isinstance(tx, optax.GradientTransformationExtraArgs)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_key = jax.random.fold_in(state.key, state.step)
        if trainable is None:
            view, merge = state.params, lambda v: v
        else:  # frozen params enter the loss as constants: no gradient is taken for them
            view, merge = trainable.view(state.params), partial(trainable.merge, state.params)
        loss, grads = loss_and_grads(
            config, view, batch, dropout_key, grad_accum, merge=merge, fsdp=fsdp
        )
        kw = {"loss": loss} if extra_args else {}
        view, opt_state = apply_gradients(tx, grads, state.opt_state, view, **kw)
        new = state.replace(step=state.step + 1, params=merge(view), opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": _lr(opt_state)}

    if shardings is not None:
        state_sh, batch_sh = shardings
        out = (state_sh, parallel.replicated(batch_sh.mesh))
        return jax.jit(train_step, donate_argnums=0, in_shardings=shardings, out_shardings=out)
    return jax.jit(train_step, donate_argnums=0)


def mesh_train_step(
    config: GPTConfig,
    tx: optax.GradientTransformation,
    key: jax.Array,
    mesh: str | None,
    grad_accum: int = 1,
) -> tuple[TrainState, Callable[[TrainState, Batch], tuple[TrainState, dict]], Callable]:
    """(fresh state, jitted step, put) for one device (`mesh` None) or the mesh spec `mesh`
    (e.g. "data=2,fsdp=4"): the state initialised shard by shard, and `put(batch)` placing a
    host (batch, seq) batch the way the step takes it. The benchmarks' and tests' way in."""
    init = lambda: init_train_state(config, tx, key)  # noqa: E731
    if mesh is None:  # today's one-device path: no mesh, no shardings
        return init(), make_train_step(config, tx, grad_accum), lambda b: b
    m = parallel.make_mesh(mesh)
    shardings = parallel.tree_shardings(jax.eval_shape(init), m)
    step = make_train_step(
        config, tx, grad_accum, shardings=(shardings, parallel.batch_sharding(m))
    )
    return parallel.init_sharded(init, shardings), step, lambda b: parallel.put_batch(b, m)


def _fsdp(shardings: tuple[Any, Any] | None) -> parallel.FSDP | None:
    """FSDP hooks when the mesh has an fsdp axis (parameters sharded at rest); else None:
    on one device or a `data` mesh every device holds the parameters whole already."""
    if shardings is None or shardings[1].mesh.shape["fsdp"] == 1:
        return None
    return parallel.FSDP(shardings[1].mesh)


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
