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
