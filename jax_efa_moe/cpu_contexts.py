"""The CPU backend of AllToAll: one all-to-all context per process, joined over libfabric.

On the CPU each rank is one process holding one device of the mesh (DESIGN §3). Set-up goes
through the ``jax.distributed`` key-value store (``bootstrap``): the ranks agree on a provider,
create their contexts (engine + registered arena), and exchange addresses and descriptors.
"""

from __future__ import annotations

import base64

import jax
import numpy as np

from jax_efa_moe import bootstrap, providers


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
    """This process's context for one AllToAll: ``context_id`` is the custom calls' attribute.

    Set-up runs in the steps of ``setup`` (every process takes part; each rank reads its
    group's payloads): "providers" (what each host offers), "contexts" (pick the provider,
    create the engine and the registered arena, publish their address and descriptor),
    "connected" (join the peers). A failure at any step on any process raises on all of them.
    """

    platform = "cpu"

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, layout,
                 setup: bootstrap.Setup, *, fabric_provider: str | None, timeout_s: float,
                 num_nics: int = 1):
        from jax_efa_moe import _jem

        self.context_id = None

        def locate() -> dict:
            self.rank, self._group = group_of_this_process(mesh, axis_name)
            return providers.local_report()

        def create() -> dict:
            self.provider = fabric_provider or providers.choose(
                [reports[p] for p in self._group])
            self.context_id = _jem.create_context(self.provider, self.rank, layout, timeout_s,
                                                  num_domains=num_nics)
            return {"address": _b64(_jem.context_address(self.context_id)),
                    "descriptor": _b64(_jem.context_descriptor(self.context_id))}

        def connect() -> dict:
            _jem.connect_context(self.context_id, [_unb64(p["address"]) for p in ranks],
                                 [_unb64(p["descriptor"]) for p in ranks])
            return {}

        reports = setup.run("providers", locate)
        try:
            everyone = setup.run("contexts", create)
            ranks = [everyone[p] for p in self._group]
            setup.run("connected", connect)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        from jax_efa_moe import _jem

        if self.context_id is not None:
            _jem.destroy_context(self.context_id)
            self.context_id = None
