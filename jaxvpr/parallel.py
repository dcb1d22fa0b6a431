"""Devices, the mesh and shardings: every placement decision of jaxvpr lives in this file.

The mesh has a ``data`` axis (batches are split along it) and an optional ``fsdp`` axis (large
parameters are split along it, batches too). On one CPU the mesh has one device and every sharding
is trivial, so the same program runs unchanged on a laptop, N GPUs or a TPU pod.
"""

from __future__ import annotations

import os

import numpy as np
import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")

# Environment variables of an explicit multi-process launch (launch/local_multiprocess.sh sets them).
ENV_COORDINATOR = "JAXVPR_COORDINATOR"      # host:port of process 0
ENV_NUM_PROCESSES = "JAXVPR_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXVPR_PROCESS_ID"
ENV_HEARTBEAT = "JAXVPR_HEARTBEAT_TIMEOUT"  # seconds before a silent process fails the others


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int | None = None) -> str:
    """Starts JAX's distributed runtime when the run spans several processes; returns how it started.

    Order of precedence:
    1. explicit arguments, or the ``JAXVPR_COORDINATOR`` / ``JAXVPR_NUM_PROCESSES`` /
       ``JAXVPR_PROCESS_ID`` environment variables ("explicit");
    2. a SLURM job with more than one task ("slurm": JAX reads ``SLURM_*``);
    3. a multi-host TPU VM pod ("tpu": JAX reads the TPU metadata);
    4. otherwise one process ("single").
    On CPU, collectives go through gloo. A process that stops sending heartbeats for
    ``heartbeat_timeout_seconds`` (default ``$JAXVPR_HEARTBEAT_TIMEOUT`` or 100) makes the others
    fail with an error instead of hanging.
    """
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = int(os.environ.get(ENV_HEARTBEAT, "100"))
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if jax.distributed.is_initialized():
        return "already"
    mode = "single"
    if coordinator_address and (num_processes or 1) > 1:
        mode = "explicit"
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        mode = "slurm"
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        mode = "tpu"
    if mode != "single":
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if mode == "explicit":
            if process_id is None:
                raise ValueError(f"{ENV_PROCESS_ID} (or process_id) is required with a coordinator address.")
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        else:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    if mode != "single" and jax.process_index() == 0:
        print(f"jax.distributed ({mode}): {jax.process_count()} processes, {jax.local_device_count()} local / "
              f"{jax.device_count()} global {jax.devices()[0].platform} devices", flush=True)
    logging.info("jax %s: process %d of %d, %d local / %d global devices (%s)", mode, jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    return mode


def _has_accelerator_plugin() -> bool:
    try:
        import importlib.util

        return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "libtpu"))
    except (ImportError, ValueError):
        return False


def is_main_process() -> bool:
    """Only process 0 writes logs, plots and results."""
    return jax.process_index() == 0


# How long the other processes wait for process 0's one-off work (e.g. AdAGeo's DDDA: hours).
ENV_WAIT = "JAXVPR_MAIN_WORK_TIMEOUT"  # seconds, default 7 days


def on_main_process(fn, name: str, timeout_s: float | None = None):
    """Runs ``fn()`` on process 0 while the other processes wait for it; returns its result on process 0.

    The others wait on a key of JAX's coordination service (not a device collective, whose Gloo
    set-up gives up after 30 s) for up to ``timeout_s`` (default ``$JAXVPR_MAIN_WORK_TIMEOUT`` or
    7 days). If ``fn`` raises, process 0 publishes the error and every waiting process raises a
    ``RuntimeError`` naming it instead of waiting out the timeout. With one process this is ``fn()``.
    """
    if jax.process_count() == 1:
        return fn()
    from jax._src import distributed

    client = distributed.global_state.client
    if timeout_s is None:
        timeout_s = float(os.environ.get(ENV_WAIT, str(7 * 24 * 3600)))
    key = f"jaxvpr/on_main/{name}"
    if jax.process_index() == 0:
        try:
            out = fn()
        except BaseException as e:
            client.key_value_set(key, f"failed: {type(e).__name__}: {e}", allow_overwrite=True)
            raise
        client.key_value_set(key, "ok", allow_overwrite=True)
        return out
    try:
        status = client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:  # the coordination service's deadline
        raise RuntimeError(f"Process {jax.process_index()} waited {timeout_s:g} s for process 0 to finish "
                           f"{name!r} (${ENV_WAIT} sets the limit): {e}") from e
    if status != "ok":
        raise RuntimeError(f"Process 0 failed at {name!r}, so process {jax.process_index()} stops: "
                           f"{status.removeprefix('failed: ')}")
    return None


def describe_topology(mesh: Mesh) -> str:
    return (f"{jax.process_count()} process(es), {jax.local_device_count()} local / {jax.device_count()} "
            f"global {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A 2-D mesh ``(data, fsdp)`` over ``devices`` (default: all global devices).

    ``data=-1`` takes every device not used by ``fsdp``. The product must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({n}).")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but {n} are available. "
            "Set mesh.data=-1 to use all of them."
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), DATA_AXES)


def local_mesh() -> Mesh:
    """A mesh over this process's devices only (per-process work such as descriptor extraction)."""
    return make_mesh(devices=jax.local_devices())


def to_host(tree):
    """Numpy copies of a pytree of (possibly multi-process, possibly sharded) arrays, on every process."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def gather_rows(local: np.ndarray, total: int) -> np.ndarray:
    """Concatenates each process's equally-sized block of rows in process order, cut to ``total`` rows."""
    if jax.process_count() == 1:
        return local[:total]
    from jax.experimental import multihost_utils

    stacked = np.asarray(multihost_utils.process_allgather(local))  # (processes, rows, ...)
    return stacked.reshape((-1,) + stacked.shape[2:])[:total]


def process_rows(total: int) -> tuple[int, int, int]:
    """This process's block ``[start, stop)`` of ``total`` rows and the common block size."""
    per = -(-total // jax.process_count())
    start = min(jax.process_index() * per, total)
    return start, min(start + per, total), per


def mesh_from_config(mesh_cfg) -> Mesh:
    """The mesh of ``config.mesh`` (fields ``data`` and ``fsdp``); ``None`` gives all devices on ``data``."""
    if mesh_cfg is None:
        return make_mesh()
    return make_mesh(int(mesh_cfg.get("data", -1)), int(mesh_cfg.get("fsdp", 1)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh; other dimensions whole."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch is split into: its size must be a multiple of this."""
    return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def param_sharding(shape: tuple[int, ...], mesh: Mesh, shard_params: bool, min_size: int = 2**18) -> NamedSharding:
    """Replicated, or (FSDP-style, ``shard_params``) split along the largest dimension divisible by
    the number of batch shards, for arrays of at least ``min_size`` elements."""
    n = num_batch_shards(mesh)
    if not shard_params or n == 1 or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXES
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def state_shardings(tree, mesh: Mesh, shard_params: bool = False, min_size: int = 2**18):
    """A sharding for every array leaf of a train state (parameters and their optimizer moments alike)."""
    return jax.tree.map(lambda x: param_sharding(tuple(np.shape(x)), mesh, shard_params, min_size), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assembles each process's rows into global arrays split over the batch axes.

    ``local[k]`` holds this process's consecutive rows of the global batch (process p holds rows
    [p * B / P, (p + 1) * B / P)); with one process it is the whole batch.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
