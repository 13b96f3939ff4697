"""Data parallelism: the device mesh, the step drivers, and input placement.

The train step is written once, *per device*, with named-axis collectives over
:data:`DATA_AXIS` (``lax.pmean`` of gradients, ``lax.all_gather`` of embeddings and
sampler updates): ``per_device_step(state, batch) -> (state, metrics)`` sees the
replicated state and its shard of the batch, and must return a replicated state and
replicated metrics. :func:`data_parallel` turns it into a step on *global* arrays,
driven either by ``jax.jit(jax.shard_map(...))`` over a :func:`make_data_mesh` mesh
(the default; JAX's recommended API) or by ``jax.pmap(axis_name="data")``; both give
the same numbers (``tests/test_parallel.py``).

Multi-host: call :func:`initialize_distributed` first thing; every process then
feeds its own slice of the global batch through :func:`shard_batch` and builds its
state identically (same seed) before :func:`replicate`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
BACKENDS = ("shard_map", "pmap")

State = TypeVar("State")
Batch = Any
Metrics = Any
StepFn = Callable[..., tuple[State, Metrics]]  # (state, batch, *replicated)

__all__ = [
    "BACKENDS",
    "DATA_AXIS",
    "check_batch_divisible",
    "data_parallel",
    "initialize_distributed",
    "make_data_mesh",
    "per_device_batch_size",
    "replicate",
    "shard_batch",
    "to_host",
]


def make_data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default), axis
    :data:`DATA_AXIS` with an explicit axis type."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} must be in [1, {len(devices)}]")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Explicit,), devices=devices[:n])


def check_batch_divisible(global_batch_size: int, num_devices: int) -> None:
    """Raises ValueError unless the global batch splits evenly over the devices.

    Call it on the config before building anything: the error names the numbers
    instead of surfacing as a shape error from inside a compiled step.
    """
    if global_batch_size <= 0 or global_batch_size % num_devices:
        lower = global_batch_size // num_devices * num_devices
        upper = lower + num_devices
        hint = f"{upper}" if lower <= 0 else f"{lower} or {upper}"
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {num_devices} "
            f"devices of the data mesh (each device gets an equal share); use e.g. {hint}"
        )


def per_device_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """B / n, the batch each device sees, after :func:`check_batch_divisible`."""
    check_batch_divisible(global_batch_size, mesh.size)
    return global_batch_size // mesh.size


def _leading_size(batch: Batch) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every leaf of the batch must share one leading (batch) axis, got shapes "
            f"{jax.tree.map(jnp.shape, batch)}"
        )
    return sizes.pop()


def data_parallel(
    per_device_step: StepFn,
    *,
    mesh: Mesh,
    backend: str = "shard_map",
    donate_state: bool = True,
    check_vma: bool = False,
    num_replicated_args: int = 0,
) -> StepFn:
    """Compiles a per-device step into a data-parallel step on global arrays.

    Args:
      per_device_step: ``(state, batch_shard) -> (state, metrics)`` using
        collectives over :data:`DATA_AXIS`; it must return the same state and
        metrics on every device (e.g. after ``lax.pmean``/``lax.all_gather``).
      mesh: a :func:`make_data_mesh` mesh; its size is the number of shards.
      backend: ``"shard_map"`` (``jax.jit`` of ``jax.shard_map``, default) or
        ``"pmap"`` (``jax.pmap``; single-process only).
      donate_state: let XLA reuse the input state's buffers for the output (the
        caller must not touch the input state afterwards; shard_map only, pmap
        works on a replicated copy).
      check_vma: shard_map's replication checking. Off by default because it
        changes autodiff: with it, ``jax.grad`` with respect to a replicated
        parameter already *sums* the per-device gradients (the transpose of the
        implicit broadcast), so the usual ``lax.pmean(grads)`` would return n times
        the mean and the step would disagree with pmap. Off, shard_map has pmap's
        semantics, and the ``P()`` out_specs are a promise the step keeps by
        construction (its outputs come from collectives).
      num_replicated_args: k extra positional arguments after the batch that every
        device sees whole and that are not donated (e.g. a dataset table):
        ``per_device_step(state, batch, *extras)``.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``state`` replicated (see
      :func:`replicate`), ``batch`` a pytree of global arrays whose leading axis
      (the global batch, divisible by the mesh size) is split across devices (see
      :func:`shard_batch`), then the ``num_replicated_args`` extras. The
      leading-axis check runs before any compilation.
    """
    num_shards = mesh.size
    if backend == "shard_map":
        step = _shard_map_step(per_device_step, mesh, donate_state, check_vma, num_replicated_args)
    elif backend == "pmap":
        step = _pmap_step(per_device_step, mesh, num_replicated_args)
    else:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")

    def checked_step(state, batch, *extras):
        if len(extras) != num_replicated_args:
            raise TypeError(
                f"the step takes (state, batch) and {num_replicated_args} replicated "
                f"argument(s), got {len(extras)}"
            )
        check_batch_divisible(_leading_size(batch), num_shards)
        return step(state, batch, *extras)

    return checked_step


def _shard_map_step(
    per_device_step: StepFn, mesh: Mesh, donate: bool, check_vma: bool, num_extras: int
) -> StepFn:
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    mapped = jax.shard_map(
        per_device_step,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), *[P()] * num_extras),
        out_specs=(P(), P()),
        check_vma=check_vma,
    )

    def global_step(state, batch, *extras):
        # With explicit axis types shard_map insists its inputs already carry the
        # in_specs shardings: reshard (a no-op when they do, as with `replicate`
        # and `shard_batch`) so that plain host or single-device arrays work too.
        return mapped(
            jax.reshard(state, replicated),
            jax.reshard(batch, split),
            *jax.reshard(extras, replicated),
        )

    return jax.jit(global_step, donate_argnums=(0,) if donate else ())


def _pmap_step(per_device_step: StepFn, mesh: Mesh, num_extras: int) -> StepFn:
    if jax.process_count() > 1:
        raise ValueError("backend='pmap' is single-process only; use backend='shard_map'")
    n = mesh.size
    mapped = jax.pmap(
        per_device_step,
        axis_name=DATA_AXIS,
        devices=list(mesh.devices.flat),
        in_axes=(0, 0, *[None] * num_extras),
    )
    # pmap wants its inputs laid out one leading-axis slice per device on a mesh of
    # Auto axis type; arrays placed on the Explicit data mesh are moved over.
    auto_mesh = Mesh(mesh.devices, (DATA_AXIS,))
    per_device, everywhere = NamedSharding(auto_mesh, P(DATA_AXIS)), NamedSharding(auto_mesh, P())

    def stack(x, shape):
        return jax.device_put(jnp.reshape(jnp.asarray(x), shape), per_device)

    def step(state, batch, *extras):
        # A leading device axis: a broadcast copy of the state, and the batch cut
        # into n contiguous shards, like P("data") does.
        state = jax.tree.map(
            lambda x: stack(jnp.broadcast_to(x, (n, *jnp.shape(x))), (n, *jnp.shape(x))), state
        )
        batch = jax.tree.map(lambda x: stack(x, (n, -1, *jnp.shape(x)[1:])), batch)
        extras = jax.device_put(extras, everywhere)
        state, metrics = mapped(state, batch, *extras)
        return jax.tree.map(lambda x: x[0], (state, metrics))

    return step


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf fully replicated on ``mesh`` (the train state's layout).

    Multi-host: every process must pass the same values (build the state from the
    same seed, or restore the same checkpoint).
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Assembles global arrays split along their leading axis over ``mesh``.

    Each process passes its *own* slice of the global batch (the whole batch on a
    single host); the global leading size is the sum over processes.
    """
    local = _leading_size(batch)
    check_batch_divisible(local, max(1, mesh.size // jax.process_count()))
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def to_host(tree: Any) -> Any:
    """NumPy copies of replicated arrays (readable on every process, multi-host too)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
) -> bool:
    """Starts multi-process JAX (``jax.distributed.initialize``) when asked to.

    Arguments left None are read from the environment variables
    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``. With none of them set the run is single-process (no
    call), unless ``auto_detect`` asks JAX to detect a managed cluster (Cloud TPU
    pods, SLURM, Open MPI). Must run before any other JAX call. CPU processes
    communicate through gloo (JAX's default CPU collectives).

    Returns:
      True when this is a multi-process run (initialised now or before).
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ.get
    coordinator_address = coordinator_address or env("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env("JAX_NUM_PROCESSES"):
        num_processes = int(env("JAX_NUM_PROCESSES"))
    if process_id is None and env("JAX_PROCESS_ID"):
        process_id = int(env("JAX_PROCESS_ID"))
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()):
        if not auto_detect:
            return False
        jax.distributed.initialize()
        return True
    if num_processes == 1:
        return False
    missing = sorted(k for k, v in given.items() if v is None)
    if missing:
        raise ValueError(
            f"multi-process run needs coordinator_address, num_processes and process_id; "
            f"got {given}, missing {missing} (flags or JAX_* environment variables)"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    logging.info(
        "jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
        coordinator_address,
        num_processes,
        process_id,
    )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
