"""Devices, the mesh and shardings: every placement decision of jaxvpr lives in this file.

The mesh has a ``data`` axis (batches are split along it) and an optional ``fsdp`` axis (large
parameters are split along it, batches too). On one CPU the mesh has one device and every sharding
is trivial, so the same program runs unchanged on a laptop, N GPUs or a TPU pod.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


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


def state_shardings(tree, mesh: Mesh, shard_params: bool = False):
    """A sharding for every array leaf of a train state (parameters and their optimizer moments alike)."""
    return jax.tree.map(lambda x: param_sharding(tuple(np.shape(x)), mesh, shard_params), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assembles each process's rows into global arrays split over the batch axes.

    ``local[k]`` holds this process's consecutive rows of the global batch (process p holds rows
    [p * B / P, (p + 1) * B / P)); with one process it is the whole batch.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
