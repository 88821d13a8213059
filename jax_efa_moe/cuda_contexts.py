"""The CUDA backend of AllToAll: peers on the same node over NVLink, the others through the
fabric (a proxy thread per GPU posting RDMA writes over libfabric: EFA in production).

A process may drive several GPUs of the mesh (one process for the whole node) or one (one
process per GPU, ``jax.distributed``); both may mix. Each rank gets an arena on its GPU; ranks
of one node map each other's arenas (peer access in one process, CUDA IPC handles exchanged
over the ``jax.distributed`` key-value store between processes). Ranks on other nodes get a
TransferEngine each: the kernels pack one chunk per fabric peer and the proxy writes it
(``cc/a2a/fabric_proxy.h``), straight from and into GPU memory where the provider registers
it (FI_HMEM), else through a pinned host copy of the arena (staged).

Which peers are on the same node: ``ranks_per_node`` consecutive ranks form a node; without
it, the ranks whose processes share a host name. ``transport="fabric"`` puts every rank on a
node of its own (how the fabric path is tested on one host); ``"nvlink"`` refuses ranks on
different nodes.

``max_sms`` bounds the grid of every kernel (the send and recv halves alike) to that many
blocks, so that they occupy at most that many SMs.

Kernels report bad input, a full buffer, a silent peer or halves out of order asynchronously,
into a status the host reads without a sync: the next call of the AllToAll fails with it
(unless XLA replays it from a command buffer, which calls no host code), and
``raise_if_failed()`` raises it after ``block_until_ready``.
"""

from __future__ import annotations

import base64
import json

import jax
import numpy as np

from jax_efa_moe import bootstrap, providers


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


def node_of_ranks(R: int, transport: str, ranks_per_node: int | None,
                  host_of_rank: list[str]) -> list[int]:
    """The node of each rank: ranks on one node reach each other over NVLink."""
    if transport == "fabric":
        nodes = list(range(R))
    elif ranks_per_node is not None:
        nodes = [r // ranks_per_node for r in range(R)]
    else:
        first = {}
        nodes = [first.setdefault(h, len(first)) for h in host_of_rank]
    if transport == "nvlink" and len(set(nodes)) > 1:
        raise ValueError(
            f"transport='nvlink' needs every rank on one node, but the {R} ranks are on "
            f"{len(set(nodes))} nodes ({'ranks_per_node' if ranks_per_node else 'host names'}); "
            "use transport='auto' to reach the other nodes through the fabric.")
    return nodes


def fewest_sms(mesh: jax.sharding.Mesh) -> tuple[int, str] | None:
    """(SMs, which GPU) of this process's GPU of the mesh with the fewest SMs; None where this
    build has no CUDA kernels (CudaContexts then says so)."""
    from jax_efa_moe import _jem

    if not getattr(_jem, "has_cuda", False):
        return None
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return min(((_jem.cuda_device_sms(int(d.local_hardware_id)), f"GPU {d.id} ({d.device_kind})")
                for d in mine), default=None)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


class CudaContexts:
    """This process's contexts for one AllToAll: ``context_id`` is the custom calls' attribute."""

    platform = "gpu"

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, layout, *, timeout_s: float,
                 zero_unused_rows: bool = True, transport: str = "auto",
                 ranks_per_node: int | None = None, fabric_provider: str | None = None,
                 num_nics: int = 1, nic_names: tuple[str, ...] = (),
                 fabric_staging: bool | None = None, max_sms: int | None = None):
        from jax_efa_moe import _jem

        if not getattr(_jem, "has_cuda", False):
            raise RuntimeError("this build of jax_efa_moe has no CUDA kernels (nvcc was not "
                               "found when it was built); reinstall on a machine with nvcc.")
        local, processes = _group_of_this_process(mesh, axis_name)
        R = layout.num_ranks
        self.ranks = [r for r, _ in local]
        self.rank = self.ranks[0]
        self.devices = [int(d.local_hardware_id) for _, d in local]
        self._processes = processes
        self._setup_timeout = timeout_s
        self.context_id = None

        # Who is on which node, and the provider, before any engine opens.
        hosts = self._gather("hosts", {"ranks": self.ranks, **providers.local_report()})
        host_of_rank = [""] * R
        for p in hosts:
            for r in p["ranks"]:
                host_of_rank[r] = p["host"]
        nodes = node_of_ranks(R, transport, ranks_per_node, host_of_rank)
        masks = [sum(1 << p for p in range(R) if nodes[p] != nodes[r]) for r in self.ranks]
        # None when every peer is on this node: no fabric is opened.
        self.provider = None
        if len(set(nodes)) > 1:
            self.provider = fabric_provider or providers.choose(hosts)

        error = None
        try:
            self.context_id = _jem.cuda_context_create(
                layout, self.ranks, self.devices, timeout_s, zero_unused_rows,
                fabric_masks=masks, provider=self.provider if any(masks) else "",
                num_domains=num_nics, nic_names=list(nic_names),
                stage_in_host=bool(fabric_staging), max_sms=max_sms or 0)
            handles, gpus, addresses, descriptors, staged, _ = zip(
                *_jem.cuda_context_endpoints(self.context_id))
            if fabric_staging is False and any(s for a, s in zip(addresses, staged) if a):
                raise RuntimeError(
                    f"fabric_staging=False, but provider '{self.provider}' cannot register GPU "
                    "memory here (no FI_HMEM with CUDA); use a libfabric built with CUDA "
                    "(the EFA installer's), or leave fabric_staging=None to stage through "
                    "pinned host memory.")
            payload = {"ranks": self.ranks, "handles": [_b64(h) for h in handles],
                       "gpus": list(gpus), "addresses": [_b64(a) for a in addresses],
                       "descriptors": [_b64(d) for d in descriptors]}
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
        handles, addresses, descriptors = ([b""] * R for _ in range(3))
        gpus = [""] * R
        for p in everyone:
            for i, r in enumerate(p["ranks"]):
                handles[r] = _unb64(p["handles"][i])
                gpus[r] = p["gpus"][i]
                addresses[r] = _unb64(p["addresses"][i])
                descriptors[r] = _unb64(p["descriptors"][i])
        if len(set(nodes)) == 1:
            addresses, descriptors = [], []
        _jem.cuda_context_connect(self.context_id, handles, gpus, addresses, descriptors)
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

    def proxy_times(self) -> list[dict]:
        """Per local rank, where its fabric steps spent their time on the proxy thread."""
        from jax_efa_moe import _jem

        return list(_jem.cuda_context_proxy_times(self.context_id))

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
