"""The CPU backend of AllToAll: one all-to-all context per process, joined over libfabric.

On the CPU each rank is one process holding one device of the mesh (DESIGN §3). Set-up goes
through the ``jax.distributed`` key-value store (``bootstrap``): the ranks agree on a provider,
create their contexts (engine + registered arena), and exchange addresses and descriptors.
"""

from __future__ import annotations

import base64
import json

import jax
import numpy as np

from jax_efa_moe import bootstrap, providers

# Set-up may wait on ranks that start late, so it gets at least this long.
_MIN_SETUP_TIMEOUT_S = 120.0


def _encode(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def _decode(raw: bytes) -> dict:
    return json.loads(raw.decode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def group_of_this_process(mesh: jax.sharding.Mesh, axis_name: str) -> tuple[int, list[int]]:
    """(rank along axis_name, process index of every rank of this process's group)."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if len(mine) != 1:
        raise ValueError(
            f"the CPU backend runs one rank per process, so each process must hold exactly one "
            f"device of the mesh; this process holds {len(mine)}. Launch one process per rank "
            "(jax_efa_moe.launch) with one CPU device each.")
    position = [int(i) for i in np.argwhere(mesh.devices == mine[0])[0]]
    axis = mesh.axis_names.index(axis_name)
    index = tuple(slice(None) if a == axis else p for a, p in enumerate(position))
    group = [d.process_index for d in mesh.devices[index].flat]
    return position[axis], group


class CpuContexts:
    """This process's context for one AllToAll: ``context_id`` is the custom calls' attribute."""

    platform = "cpu"

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, layout, *,
                 fabric_provider: str | None, timeout_s: float, num_nics: int = 1):
        from jax_efa_moe import _jem

        self.rank, group = group_of_this_process(mesh, axis_name)
        process, world = jax.process_index(), jax.process_count()
        setup_timeout = max(timeout_s, _MIN_SETUP_TIMEOUT_S)

        def gather(key: str, payload: dict) -> list[dict]:
            everyone = bootstrap.all_gather_bytes(f"all_to_all/{key}", _encode(payload),
                                                  process, world, timeout_s=setup_timeout)
            return [_decode(everyone[p]) for p in group]

        if fabric_provider is None:
            fabric_provider = providers.choose(gather("providers", providers.local_report()))
        self.provider = fabric_provider

        # A rank that cannot create its context says so, so that the others fail too instead
        # of waiting for its address.
        self.context_id = None
        error = None
        try:
            self.context_id = _jem.create_context(fabric_provider, self.rank, layout, timeout_s,
                                                  num_domains=num_nics)
            payload = {"address": _b64(_jem.context_address(self.context_id)),
                       "descriptor": _b64(_jem.context_descriptor(self.context_id))}
        except Exception as e:  # reported to every rank, then raised here
            error = e
            payload = {"error": f"{type(e).__name__}: {e}"}
        ranks = gather("contexts", payload)
        failed = [(r, p["error"]) for r, p in enumerate(ranks) if "error" in p]
        if failed:
            self.close()
            if error is not None:
                raise error
            raise RuntimeError(
                "all-to-all set-up failed on other ranks: " +
                "; ".join(f"rank {r}: {message}" for r, message in failed))
        _jem.connect_context(self.context_id, [_unb64(p["address"]) for p in ranks],
                             [_unb64(p["descriptor"]) for p in ranks])

    def close(self) -> None:
        from jax_efa_moe import _jem

        if self.context_id is not None:
            _jem.destroy_context(self.context_id)
            self.context_id = None
