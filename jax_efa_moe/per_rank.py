"""Arrays with one block per rank of an expert-parallel mesh axis, in either process model.

``jax.shard_map`` over the axis sees each block as the per-rank value. These helpers build such
arrays from per-rank NumPy blocks and read back the blocks this process holds, so the same
code runs with one process per device (``jax.distributed``) and with one process driving
several devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def ep_mesh(axis_name: str = "ep") -> Mesh:
    """A 1-D mesh over every device of every process, in process order."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis_name,))


def local_ranks(mesh: Mesh, axis_name: str) -> list[int]:
    """The positions along ``axis_name`` of this process's devices."""
    local = {d.id for d in jax.local_devices()}
    return [i for i, d in enumerate(mesh.devices.reshape(-1)) if d.id in local]


def put(mesh: Mesh, axis_name: str, block: Callable[[int], np.ndarray]) -> jax.Array:
    """A global array whose block for rank r is ``block(r)`` (only local ranks are asked)."""
    ranks = mesh.shape[axis_name]
    first = np.asarray(block(local_ranks(mesh, axis_name)[0]))
    shape = (ranks * first.shape[0],) + first.shape[1:] if first.ndim else (ranks,)
    rows = max(first.shape[0], 1) if first.ndim else 1

    def fetch(index):
        start = index[0].start or 0
        b = np.asarray(block(start // rows))
        return b if b.ndim else b.reshape(1)

    return jax.make_array_from_callback(shape, NamedSharding(mesh, P(axis_name)), fetch)


def get(array: jax.Array, mesh: Mesh, axis_name: str) -> dict[int, np.ndarray]:
    """This process's blocks of ``array``, by rank."""
    rows = array.shape[0] // mesh.shape[axis_name]
    return {(s.index[0].start or 0) // rows: np.asarray(s.data) for s in array.addressable_shards}
