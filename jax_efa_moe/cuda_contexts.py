"""The CUDA backend of AllToAll: every rank on one node, reached over NVLink.

A process may drive several GPUs of the mesh (one process for the whole node) or one (one
process per GPU, ``jax.distributed``); both may mix, as long as all ranks of an all-to-all
group share the node. Each rank gets an arena on its GPU; ranks in this process map each
other's arenas with peer access, ranks in other processes through CUDA IPC handles exchanged
over the ``jax.distributed`` key-value store.

Kernels report bad input, a full buffer or a silent peer asynchronously, into a status the
host reads without a sync: the next call of the AllToAll fails with it, and
``raise_if_failed()`` raises it after ``block_until_ready``.
"""

from __future__ import annotations

import base64
import json

import jax
import numpy as np

from jax_efa_moe import bootstrap


def _group_of_this_process(mesh: jax.sharding.Mesh, axis_name: str):
    """(this process's devices of the group as (rank, device), processes of the group)."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not mine:
        raise ValueError("this process holds no device of the mesh")
    axis = mesh.axis_names.index(axis_name)
    groups = set()
    local = []
    for d in mine:
        position = [int(i) for i in np.argwhere(mesh.devices == d)[0]]
        index = tuple(slice(None) if a == axis else p for a, p in enumerate(position))
        groups.add(tuple(dev.id for dev in mesh.devices[index].flat))
        local.append((position[axis], d))
    if len(groups) != 1:
        raise ValueError(
            f"the devices of this process belong to {len(groups)} different groups along "
            f"{axis_name!r}; the CUDA backend needs each process's devices in one group "
            "(one AllToAll per group of processes).")
    group = next(iter(groups))
    by_id = {d.id: d for d in mesh.devices.flat}
    processes = sorted({by_id[i].process_index for i in group})
    return sorted(local, key=lambda rd: rd[0]), processes


class CudaContexts:
    """This process's contexts for one AllToAll: ``context_id`` is the custom calls' attribute."""

    platform = "gpu"
    provider = "nvlink"

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, layout, *, timeout_s: float,
                 zero_unused_rows: bool = True):
        from jax_efa_moe import _jem

        if not getattr(_jem, "has_cuda", False):
            raise RuntimeError("this build of jax_efa_moe has no CUDA kernels (nvcc was not "
                               "found when it was built); reinstall on a machine with nvcc.")
        local, processes = _group_of_this_process(mesh, axis_name)
        self.ranks = [r for r, _ in local]
        self.rank = self.ranks[0]
        self.devices = [int(d.local_hardware_id) for _, d in local]
        self._processes = processes
        self._setup_timeout = timeout_s
        self.context_id = None

        error = None
        try:
            self.context_id = _jem.cuda_context_create(layout, self.ranks, self.devices,
                                                       timeout_s, zero_unused_rows)
            handles = _jem.cuda_context_ipc_handles(self.context_id)
            payload = {"ranks": self.ranks,
                       "handles": [base64.b64encode(h).decode() for h in handles]}
        except Exception as e:  # reported to every process, then raised here
            error = e
            payload = {"error": f"{type(e).__name__}: {e}"}
        everyone = self._gather("contexts", payload)
        failed = [p["error"] for p in everyone if "error" in p]
        if failed:
            self.close(barrier=False)
            if error is not None:
                raise error
            raise RuntimeError("all-to-all set-up failed in other processes: " + "; ".join(failed))
        handles = [b""] * layout.num_ranks
        for p in everyone:
            for r, h in zip(p["ranks"], p["handles"]):
                handles[r] = base64.b64decode(h.encode())
        _jem.cuda_context_connect(self.context_id, handles)
        # Nobody writes into a peer's arena before that peer has mapped everyone's.
        self._gather("connected", {})

    def _gather(self, key: str, payload: dict) -> list[dict]:
        if jax.process_count() == 1:
            return [payload]
        everyone = bootstrap.all_gather_bytes(
            f"cuda_all_to_all/{key}", json.dumps(payload).encode(), jax.process_index(),
            jax.process_count(), timeout_s=self._setup_timeout)
        return [json.loads(everyone[p].decode()) for p in self._processes]

    def failures(self) -> list[str]:
        """Per local rank, the first error its kernels reported ('' if none)."""
        from jax_efa_moe import _jem

        return list(_jem.cuda_context_failures(self.context_id))

    def raise_if_failed(self) -> None:
        found = [f for f in self.failures() if f]
        if found:
            raise RuntimeError("all-to-all step failed: " + " | ".join(found))

    def close(self, barrier: bool = True) -> None:
        """Waits for this process's GPUs, then for the other processes (their kernels write
        into this process's arenas), then frees the arenas."""
        from jax_efa_moe import _jem

        if self.context_id is None:
            return
        _jem.cuda_context_synchronize(self.context_id)
        if barrier:
            try:
                self._gather("closing", {})
            except TimeoutError:
                pass  # a dead peer writes nothing more
        _jem.cuda_context_destroy(self.context_id)
        self.context_id = None
