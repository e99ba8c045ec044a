"""Mesh, shardings and multi-process setup: the same train step over many devices and hosts.

JAX's own machinery does the work (`jax.make_mesh`, `NamedSharding`, `jax.jit` with
shardings, `jax.distributed`); this module only decides where each array lives.
Axes: `data` splits the batch (parameters replicated); `fsdp` splits the batch too and
shards parameters and optimizer state along their largest divisible dimension.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over both axes
# Leaves with fewer elements stay replicated: sharding a bias or a norm scale saves
# nothing and costs a collective per use (nanodo and MaxText draw the same line).
MIN_SHARD_SIZE = 2**10
# Seconds without a heartbeat before JAX's coordination service declares a process dead
# (JAX's own default; TrainConfig.heartbeat_timeout, `--heartbeat-timeout`, changes it).
HEARTBEAT_TIMEOUT = 100
STACKED = "trf_blocks"  # the scanned blocks' params: every leaf (layers, ...)


def parse_mesh(spec: str) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; missing axes are 1. Pure: checks the
    syntax only (the device count is `make_mesh`'s), so it can run before JAX starts."""
    sizes = dict.fromkeys(AXES, 1)
    seen: set[str] = set()
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"--mesh {spec!r}: {part.strip()!r} is not AXIS=SIZE with AXIS in {list(AXES)} "
                "and SIZE >= 1; e.g. --mesh data=2,fsdp=4"
            )
        if name in seen:
            raise ValueError(f"--mesh {spec!r} names {name!r} twice; give each axis once")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | None, devices: list[Any] | None = None) -> Mesh:
    """A (`data`, `fsdp`) mesh over the first data*fsdp devices of all processes.

    Args:
      spec: "data=N,fsdp=M"; None puts every device on `data`.
      devices: the devices to draw from (default: `jax.devices()`, all processes).
    """
    sizes = parse_mesh(spec) if spec is not None else None  # bad syntax: before any device
    devices = list(jax.devices() if devices is None else devices)
    sizes = sizes or {"data": len(devices), "fsdp": 1}
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(
            f"--mesh {spec!r} needs {n} devices but {len(devices)} are available; "
            f"make data*fsdp at most {len(devices)}"
        )
    shape = tuple(sizes[a] for a in AXES)
    # Auto axes: jit propagates the shardings we give it through the model.
    return jax.make_mesh(shape, AXES, (AxisType.Auto,) * len(AXES), devices=devices[:n])


def batch_size_check(mesh: Mesh, batch_size: int, grad_accum: int = 1) -> None:
    """Raise when the global batch (or each of its `grad_accum` micro-batches) does not split
    evenly over the batch axes."""
    ways = batch_ways(mesh)
    if batch_size % ways:
        raise ValueError(
            f"batch_size={batch_size} does not split over {ways} devices (mesh "
            f"{dict(mesh.shape)}); use a batch size that is a multiple of {ways} or a "
            "smaller --mesh (e.g. --mesh data=1)"
        )
    if (batch_size // grad_accum) % ways:
        raise ValueError(
            f"batch_size={batch_size} / grad_accum={grad_accum} = {batch_size // grad_accum} "
            f"rows per micro-batch do not split over {ways} devices (mesh {dict(mesh.shape)}); "
            f"use a batch size that is a multiple of {ways * grad_accum} or a smaller --grad-accum"
        )


def batch_ways(mesh: Mesh) -> int:
    """How many pieces the batch dimension is cut into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def leaf_spec(
    shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARD_SIZE, *, stacked: bool = False
) -> P:
    """FSDP spec of one leaf: `fsdp` on its largest dimension divisible by the axis size.

    Replicated when `fsdp == 1`, the leaf is small, or no dimension divides. A `stacked` leaf
    (scanned layers, (layers, ...)) never shards its layer axis: each layer gets the spec of
    the unrolled leaf, so the scan body gathers one layer at a time.
    """
    if stacked:
        layer = leaf_spec(shape[1:], fsdp, min_size)
        return P(None, *layer) if layer != P() else P()
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    dims = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % fsdp == 0]
    if not dims:
        return P()
    spec: list[str | None] = [None] * len(shape)
    spec[int(dims[0])] = "fsdp"
    return P(*spec)


def is_stacked(path: tuple[Any, ...]) -> bool:
    """Whether a key path leads into scanned blocks (`trf_blocks/...`, a leading layer axis)."""
    return any(getattr(k, "key", None) == STACKED for k in path)


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state).

    The rule depends on the shape (and on being a stacked layer leaf) only, so AdamW's
    moments shard exactly as their params.
    """
    fsdp = mesh.shape["fsdp"]

    def one(path: tuple[Any, ...], x: Any) -> NamedSharding:
        spec = leaf_spec(tuple(x.shape), fsdp, min_size, stacked=is_stacked(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (scalars, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over `data` x `fsdp`; the sequence dimension whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


@dataclasses.dataclass(frozen=True)
class FSDP:
    """What the model does with its parameters and activations on a mesh with an `fsdp` axis.

    Parameters rest sharded (`leaf_spec`). `gather` brings a subtree whole just before it is
    used (one block's, inside the scan body or per unrolled block) and, in the backward pass,
    constrains its gradient back to the shard: XLA emits an all-gather forward and a
    reduce-scatter backward, per block, so no device ever holds the whole model or its whole
    gradient. `batch` pins an activation to the batch axes, so XLA:SPMD never mixes batch-
    and feature-sharded activations (it then falls back to "involuntary full
    rematerialization" of whole arrays).
    """

    mesh: Mesh
    min_size: int = MIN_SHARD_SIZE

    def gather(self, tree: Any) -> Any:
        """Every leaf of `tree` (unstacked shapes) whole on every device; gradients sharded."""
        whole = replicated(self.mesh)
        fsdp = self.mesh.shape["fsdp"]

        def one(x: jax.Array) -> jax.Array:
            spec = leaf_spec(tuple(x.shape), fsdp, self.min_size)
            if spec == P():
                return x  # small or indivisible: replicated at rest already
            return _gather(x, whole, NamedSharding(self.mesh, spec))

        return jax.tree.map(one, tree)

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        """Rows `ids` (batch, seq) of a sharded `table` (vocab, emb) -> (batch, seq, emb), rows
        split over the batch axes, without gathering the table (nor, backward, summing a
        whole-table gradient): each device looks its ids up in its own shard."""
        spec = leaf_spec(tuple(table.shape), self.mesh.shape["fsdp"], self.min_size)
        if spec == P():
            return self.batch(jnp.take(table, ids, axis=0))
        body = _rows_of_emb_shard if spec == P(None, "fsdp") else _rows_of_vocab_shard
        batch = P(BATCH_AXES)
        return jax.shard_map(body, mesh=self.mesh, in_specs=(spec, batch), out_specs=batch)(
            table, ids
        )

    def batch(self, x: jax.Array, axis: int = 0) -> jax.Array:
        """`x` with its dimension `axis` (the rows) split over the batch axes, the rest whole."""
        spec = [None] * x.ndim
        spec[axis] = BATCH_AXES
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))


def _rows_of_emb_shard(table: jax.Array, ids: jax.Array) -> jax.Array:
    """shard_map body: table (vocab, emb/f), ids (rows, seq) -> (rows, seq, emb).

    Every id of the fsdp group is looked up in this device's columns, then an all-to-all
    trades columns for rows (the fsdp group's rows are gathered in the order they are split).
    """
    group_ids = jax.lax.all_gather(ids, "fsdp", axis=0, tiled=True)  # (f rows, seq)
    cols = jnp.take(table, group_ids, axis=0)  # (f rows, seq, emb/f)
    return jax.lax.all_to_all(cols, "fsdp", split_axis=0, concat_axis=2, tiled=True)


def _rows_of_vocab_shard(table: jax.Array, ids: jax.Array) -> jax.Array:
    """shard_map body: table (vocab/f, emb), ids (rows, seq) -> (rows, seq, emb).

    Every id of the fsdp group is looked up where this device holds its row (zeros
    elsewhere); summing over the group (reduce-scatter) adds one row to zeros: exact.
    """
    group_ids = jax.lax.all_gather(ids, "fsdp", axis=0, tiled=True)  # (f rows, seq)
    n = table.shape[0]
    local = group_ids - jax.lax.axis_index("fsdp") * n
    mine = (local >= 0) & (local < n)  # (f rows, seq)
    rows = jnp.take(table, jnp.clip(local, 0, n - 1), axis=0)  # (f rows, seq, emb)
    rows = jnp.where(mine[..., None], rows, jnp.zeros((), rows.dtype))
    return jax.lax.psum_scatter(rows, "fsdp", scatter_dimension=0, tiled=True)


def _gather(x: jax.Array, whole: NamedSharding, shard: NamedSharding) -> jax.Array:
    """All-gather a sharded leaf (`FSDP.gather`). JAX transposes each sharding constraint into
    the same constraint on the cotangent: the gradient, a partial sum per batch shard, is
    summed whole across the devices, then each keeps its own shard (all-reduce + slice, which
    XLA's GPU and TPU pipelines fuse into one reduce-scatter). Summed whole first, so XLA never
    re-shards batch-sharded operands of a gradient onto the parameter's feature dimension."""
    return jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(x, shard), whole)


def init_sharded(init: Callable[[], Any], shardings: Any) -> Any:
    """Run `init()` under jit so each device computes only its own shards (never the whole
    model on one device); the random bits equal the unsharded ones (partitionable threefry)."""
    return jax.jit(init, out_shardings=shardings)()


def local_rows(sharding: NamedSharding, n_rows: int) -> slice:
    """The rows of an (n_rows, ...) array that this process's devices hold under `sharding`."""
    index_map = sharding.addressable_devices_indices_map((n_rows, 1))
    spans = sorted({idx[0].indices(n_rows)[:2] for idx in index_map.values()})
    # Devices are ordered by process in jax.devices(), so a process's rows are contiguous.
    assert all(a[1] >= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    lo, hi = spans[0][0], max(b for _, b in spans)
    return slice(lo, hi)


def put_batch(
    batch: tuple[np.ndarray, ...], mesh: Mesh, *, global_rows: int | None = None
) -> tuple[jax.Array, ...]:
    """Host arrays (rows, ...) -> global arrays on `mesh`, rows split over the batch axes.

    Args:
      batch: this process's rows (`local_rows` of the batch sharding) when `global_rows` is
        given; otherwise the whole batch, of which each process keeps its own rows. A whole
        batch that does not split evenly (the last validation batch) is replicated.
    """
    if global_rows is None:
        global_rows = len(batch[0])
        if global_rows % batch_ways(mesh):
            rep = replicated(mesh)
            return tuple(jax.make_array_from_process_local_data(rep, x, x.shape) for x in batch)
        rows = local_rows(batch_sharding(mesh), global_rows)
        batch = tuple(x[rows] for x in batch)
    sharding = batch_sharding(mesh)
    return tuple(
        jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))
        for x in batch
    )


def to_local(tree: Any, mesh: Mesh) -> Any:
    """Gather a sharded pytree whole onto one local device (for sampling, which is
    single-device code); a no-op for arrays that already live on one device."""
    if mesh.size == 1:
        return tree
    whole = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), whole)


def check_distributed_args(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Raise ValueError naming the flag for process arguments that do not describe a run.

    Pure: runs before JAX or the network start. JAX's own checks name no flag, and a
    coordinator without a port ends in an IndexError, one above 65535 in an abort (SIGABRT).
    """
    given = (coordinator, num_processes, process_id)
    if all(x is None for x in given):
        return  # JAX reads its environment (JAX_*, Slurm, Open MPI, TPU)
    if any(x is None for x in given):
        raise ValueError(
            "--coordinator, --num-processes and --process-id go together; pass all three "
            "(or none, with the JAX_* environment or --distributed)"
        )
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id={process_id} is not in 0..{num_processes - 1} "
            f"(--num-processes={num_processes}); number the processes 0 to {num_processes - 1}"
        )
    host, colon, port = coordinator.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 2**16):
        raise ValueError(
            f"--coordinator={coordinator!r} is not HOST:PORT with a port in 1..65535; "
            "e.g. --coordinator 10.0.0.1:1234 (the address of process 0)"
        )


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
) -> None:
    """Start JAX's distributed runtime before any device is touched.

    With no arguments `jax.distributed.initialize` reads `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` or detects Slurm, Open MPI and TPU pods.
    `heartbeat_timeout`: seconds without a heartbeat after which JAX declares a process
    dead and aborts all the others (`fit` ends them cleanly at a quarter of it).

    Raises:
      ValueError: the arguments do not describe a run (`check_distributed_args`).
    """
    check_distributed_args(coordinator, num_processes, process_id)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    log.info("process %d of %d", jax.process_index(), jax.process_count())


def coordination_client() -> Any:
    """The client of JAX's coordination service (its key-value store), or None when this
    process did not start the distributed runtime. (Orbax reaches it the same way.)"""
    from jax._src import distributed

    return distributed.global_state.client


def is_main_process() -> bool:
    """Only process 0 prints, writes metrics and plots."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
