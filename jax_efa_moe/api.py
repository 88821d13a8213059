"""The public API: ``AllToAll``, the MoE dispatch and combine of expert parallelism.

Create one per process outside of ``jit``; call its methods inside ``jax.shard_map`` over
``axis_name``, with per-rank shapes::

    comm = AllToAll(mesh, "ep", num_experts=64, experts_per_token=4, hidden=1024,
                    max_tokens_per_rank=128)

    def layer(x, topk_ids, topk_weights):               # per rank: [T, H], [T, k], [T, k]
        d = comm.dispatch(x, topk_ids, topk_weights)
        y = experts(d.expert_x, d.group_sizes)         # e.g. jax.lax.ragged_dot
        return comm.combine(y, d.handle)               # [T, H]

    jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

Every result, the handle included, is a pytree of arrays, so it can cross ``jit`` and
``shard_map`` boundaries (sharded over ``axis_name`` along its first dimension).

Every method is differentiable in reverse mode (``jax.grad``): the backward pass runs the mirror
exchanges with the forward's handle (``autodiff.py`` says how, and what float8 dispatch does).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_efa_moe import autodiff, bootstrap, config as _config, ops
from jax_efa_moe.config import AllToAllConfig

_TRANSPORTS = ("auto", "fabric", "nvlink")


class DispatchHandle(NamedTuple):
    """What combine needs from its dispatch (cc/ffi/README.md says what each array means)."""

    send_tokens: jax.Array      # int32 [R]: tokens this rank sent to each rank
    send_index: jax.Array       # int32 [T, k]: each token's record per destination rank
    num_tokens: jax.Array       # int32 [1]
    recv_tokens: jax.Array      # int32 [R]: tokens received from each rank
    record_rows: jax.Array      # int32 [N, k]: expert_x row of each received token's slot
    record_weights: jax.Array   # float32 [N, k]
    home_offsets: jax.Array     # int32 [R]: where partials land on each home rank


class Dispatched(NamedTuple):
    """The tokens this rank's experts must process, grouped by local expert."""

    expert_x: jax.Array                 # [max_recv_tokens, hidden], dispatch dtype
    expert_x_scale: jax.Array | None    # float32 [max_recv_tokens, hidden // 128], fp8 only
    expert_counts: jax.Array            # int32 [L]: rows of each local expert
    group_sizes: jax.Array              # int32 [L]: counts rounded up to expert_alignment
    handle: Any                         # DispatchHandle (the reference has its own)


class PendingDispatch(NamedTuple):
    """dispatch_send's result, for dispatch_recv."""

    send_tokens: jax.Array
    send_index: jax.Array
    num_tokens: jax.Array
    grad_link: jax.Array        # float32 [R], zeros: joins the halves' backward (autodiff.py)


class PendingCombine(NamedTuple):
    """combine_send's result, for combine_recv."""

    sent: jax.Array
    handle: DispatchHandle
    grad_link: jax.Array        # float32 [R], zeros: joins the halves' backward (autodiff.py)


def _check_transport(platform: str, num_ranks: int, ranks_per_node, transport) -> int | None:
    """What the backend of ``platform`` in this build can reach; -> ranks_per_node."""
    if transport not in _TRANSPORTS:
        raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
    if ranks_per_node is not None:
        ranks_per_node = _config.check_int("ranks_per_node", ranks_per_node)
        if num_ranks % ranks_per_node:
            raise ValueError(f"ranks_per_node = {ranks_per_node} must divide the {num_ranks} "
                             "ranks")
    if platform == "cpu":
        if transport == "nvlink":
            raise ValueError("transport='nvlink' needs GPUs; on the CPU every peer is reached "
                             "through the fabric (transport='auto' or 'fabric').")
    elif platform != "gpu":
        raise ValueError(f"AllToAll has no backend for devices of platform '{platform}' in "
                         "this build.")
    return ranks_per_node


def _ranks_of_this_process(mesh, axis_name: str) -> list[int]:
    axis = mesh.axis_names.index(axis_name)
    return sorted(int(np.argwhere(mesh.devices == d)[0][axis]) for d in mesh.devices.flat
                  if d.process_index == jax.process_index())


def _label(mesh, axis_name: str) -> str:
    """This process in set-up messages: its ranks, and the process where ranks repeat."""
    ranks = _ranks_of_this_process(mesh, axis_name)
    if not ranks:
        return f"process {jax.process_index()} (no rank)"
    label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
    if jax.process_count() > mesh.shape[axis_name]:
        label = f"process {jax.process_index()} ({label})"
    return label


def _release(contexts) -> None:
    """Runs when an AllToAll that was not closed is garbage collected. Nothing here may wait
    for peers: they collect at other times, and a set-up exchange here would shift the
    key-value store's keys under the next set-up. So the CUDA backend skips its closing
    barrier."""
    if contexts.platform == "gpu":
        contexts.close(barrier=False)
    else:
        contexts.close()


class AllToAll(_config.ConfigAttributes):
    """Expert-parallel dispatch and combine over the ranks of ``mesh`` along ``axis_name``.

    The sizes and dtypes become ``self.config`` (an :class:`AllToAllConfig`, also read as
    attributes: ``comm.hidden``, ``comm.local_experts``). Rank r holds experts [r * L, (r + 1)
    * L), L = num_experts / ranks. ``max_recv_tokens`` bounds the rows of ``expert_x``; the
    default fits any routing. ``zero_unused_rows``: whether the rows of ``expert_x`` past the
    last group are zeroed (False spares that write on GPUs, about a quarter of a prefill
    dispatch at EP2; such rows then hold stale data, which ``group_sizes`` tells apart and
    ``ragged_dot`` never reads, but which a mask applied by multiplying would turn into NaN,
    hence the default True; the CPU backend always zeroes them). ``timeout_s`` bounds every
    wait on a peer, set-up included: a dead peer becomes an error, never a hang. After an error
    the instance refuses further calls; create a new one.

    Transport (GPUs): peers on the same node (``ranks_per_node`` consecutive ranks, or by host
    name when None) are reached over NVLink, the others through the fabric
    (``fabric_provider``, e.g. ``efa``; found automatically when None) by a proxy thread per
    GPU; the attribute ``fabric_provider`` then names the provider in use (None when every
    peer is an NVLink peer). ``transport="fabric"`` sends every peer through the fabric, ``"nvlink"`` refuses
    ranks on other nodes. ``num_nics`` NICs per GPU (the nearest by PCI topology, or
    ``nic_names``) share the peers. ``fabric_staging``: None uses GPU memory directly where
    the provider registers it (FI_HMEM) and stages through pinned host memory otherwise; True
    always stages; False requires FI_HMEM. On the CPU every peer goes through the fabric.

    SM budget (GPUs): ``max_sms`` bounds the SMs that each communication kernel occupies (every
    send and recv half, forward and backward), as DeepEP's ``Buffer.set_num_sms`` does, from 1
    to the GPU's SMs; None uses every SM. Kernels then run on fewer blocks and take longer, and
    the other SMs stay free for work that runs at the same time: kernels on other streams (XLA
    runs the ops of one stream one after another, so a GEMM placed between ``dispatch_send`` and
    ``dispatch_recv`` on the same stream gains nothing from it) or other processes on the GPU.
    On the CPU it is checked and ignored: steps run on the calling thread, so the same code
    runs on both.

    Every rank must pass the same arguments (``timeout_s``, ``zero_unused_rows`` and
    ``max_sms`` may differ); set-up compares them and raises on every rank, naming what
    differs. When set-up fails on one rank, every rank raises. ``close()`` releases the
    buffers and the engine; an AllToAll dropped without it is released when garbage collected.

    For gradients it opens a second context beside its own, where the backward pass runs:
    the same routing layout, combine dtype both ways, H + H/128 + k columns (rounded up to 16).
    ``differentiable=False`` (inference) spares that context; a backward pass then raises.
    """

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, *, num_experts: int,
                 experts_per_token: int, hidden: int, max_tokens_per_rank: int,
                 dispatch_dtype: Any = jnp.bfloat16, combine_dtype: Any = jnp.bfloat16,
                 max_recv_tokens: int | None = None, expert_alignment: int = 1,
                 ranks_per_node: int | None = None, transport: str = "auto",
                 fabric_provider: str | None = None, num_nics: int = 1,
                 nic_names: tuple[str, ...] = (), fabric_staging: bool | None = None,
                 zero_unused_rows: bool = True, differentiable: bool = True,
                 max_sms: int | None = None, timeout_s: float = 60.0):
        self._contexts = None
        setup = bootstrap.Setup("AllToAll", timeout_s)
        # Bad arguments on one rank are published before raising, so that the other ranks
        # raise at once rather than wait for this one.
        try:
            num_ranks = _config.axis_size(mesh, axis_name)
            setup.label = _label(mesh, axis_name)
            self.config = AllToAllConfig(
                num_ranks=num_ranks, num_experts=num_experts,
                experts_per_token=experts_per_token, hidden=hidden,
                max_tokens_per_rank=max_tokens_per_rank, dispatch_dtype=dispatch_dtype,
                combine_dtype=combine_dtype, max_recv_tokens=max_recv_tokens,
                expert_alignment=expert_alignment)
            platform = mesh.devices.flat[0].platform
            ranks_per_node = _check_transport(platform, self.config.num_ranks, ranks_per_node,
                                              transport)
            if fabric_provider is not None and not isinstance(fabric_provider, str):
                raise TypeError(f"fabric_provider must be a libfabric provider name or None, "
                                f"got {fabric_provider!r}")
            num_nics = _config.check_int("num_nics", num_nics)
            nic_names = tuple(nic_names)
            if not all(isinstance(n, str) for n in nic_names):
                raise TypeError(f"nic_names must be libfabric domain names, got {nic_names!r}")
            if fabric_staging is not None:
                fabric_staging = _config.check_bool("fabric_staging", fabric_staging)
            self.zero_unused_rows = _config.check_bool("zero_unused_rows", zero_unused_rows)
            gpu_sms = None
            if platform == "gpu" and max_sms is not None:
                from jax_efa_moe.cuda_contexts import fewest_sms

                gpu_sms = fewest_sms(mesh)
            self.max_sms = _config.check_max_sms(max_sms, gpu_sms)
            differentiable = _config.check_bool("differentiable", differentiable)
            self.timeout_s = setup.timeout_s = _config.check_timeout(timeout_s)
            layout = self.config.layout()
        except Exception as e:
            setup.fail("config", e)
            raise
        setup.agree("config", {**self.config.fingerprint(), "axis_name": str(axis_name),
                               "ranks_per_node": ranks_per_node, "transport": transport,
                               "fabric_provider": fabric_provider,
                               "differentiable": differentiable})
        self.mesh, self.axis_name = mesh, axis_name
        self.ranks_per_node, self.transport = ranks_per_node, transport
        # How this AllToAll reaches its peers, as given: the gradients' twin opens the same way.
        self.transport_options = dict(
            ranks_per_node=ranks_per_node, transport=transport, fabric_provider=fabric_provider,
            num_nics=num_nics, nic_names=nic_names, fabric_staging=fabric_staging)

        if platform == "cpu":
            from jax_efa_moe.cpu_contexts import CpuContexts

            self._contexts = CpuContexts(mesh, axis_name, layout, setup,
                                         fabric_provider=fabric_provider,
                                         timeout_s=self.timeout_s, num_nics=num_nics)
        else:
            from jax_efa_moe.cuda_contexts import CudaContexts

            self._contexts = CudaContexts(
                mesh, axis_name, layout, timeout_s=self.timeout_s,
                zero_unused_rows=self.zero_unused_rows, transport=transport,
                ranks_per_node=ranks_per_node, fabric_provider=fabric_provider,
                num_nics=num_nics, nic_names=nic_names, fabric_staging=fabric_staging,
                max_sms=self.max_sms)
        self._finalizer = weakref.finalize(self, _release, self._contexts)
        self._finalizer.atexit = False  # at exit the process's teardown releases everything
        self.rank = self._contexts.rank
        self.fabric_provider = self._contexts.provider
        self._ops = ops.OpConfig(self._contexts.context_id, self.config)
        self._gradients = None
        try:
            self._gradients = autodiff.Gradients.open(self, differentiable)
        except BaseException:
            self.close()
            raise

    # --- lifetime ---

    def close(self) -> None:
        """Releases the buffers and the engine. Idempotent; finish running steps first, and run
        no jitted function that used this AllToAll afterwards: on GPUs XLA may replay its
        command buffers, which hold the freed buffers' addresses, without calling the custom
        calls that would refuse."""
        if getattr(self, "_gradients", None) is not None:
            self._gradients.close()
            self._gradients = None
        if self._contexts is not None:
            self._finalizer.detach()
            self._contexts.close()
            self._contexts = None

    def fabric_times(self) -> list[dict] | None:
        """On GPUs, per rank of this process: where its steps through the fabric spent their
        time so far on the proxy thread, summed over steps, per phase ("dispatch",
        "combine"): ``steps``, ``post_ns`` (submitting the writes), ``data_wait_ns`` (writes
        submitted until every fabric peer's data arrived), ``credit_wait_ns`` (credit sent
        until every fabric peer's arrived). None on the CPU backend, whose steps run on the
        caller's thread."""
        times = getattr(self._contexts, "proxy_times", None)
        return None if times is None else times()

    def raise_if_failed(self) -> None:
        """Raises the first error a step reported, if any. On GPUs the kernels report errors
        (bad expert ids, num_tokens, capacity, a silent peer, halves out of order) without
        stopping the host: call this after ``jax.block_until_ready``; the next call of this
        AllToAll also raises it, unless XLA replays that call from a command buffer. On the
        CPU steps raise at once, so this never raises there."""
        check = getattr(self._contexts, "raise_if_failed", None)
        if check is not None:
            check()
        if self._gradients is not None:
            self._gradients.raise_if_failed()

    def __enter__(self) -> AllToAll:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- dispatch ---

    def dispatch(self, x, topk_ids, topk_weights, *, x_scale=None,
                 num_tokens=None) -> Dispatched:
        """Sends each token to the ranks of its experts; returns them grouped by local expert.

        x [T, H] in dispatch_dtype; topk_ids int32 [T, k] (-1 = unused slot); topk_weights
        float32 [T, k]; x_scale float32 [T, H // 128], float8 only; num_tokens an int32
        scalar, rows at and past it are ignored (default: all T).
        """
        operands = self._dispatch_operands("dispatch", x, topk_ids, topk_weights, x_scale,
                                           num_tokens)
        send_tokens, send_index, *recv = self._differentiable("dispatch").dispatch(*operands)
        return self._dispatched(send_tokens, send_index, operands[-1].reshape(1), recv)

    def dispatch_send(self, x, topk_ids, topk_weights, *, x_scale=None,
                      num_tokens=None) -> PendingDispatch:
        """The first half of dispatch: packs and posts what can go at once."""
        operands = self._dispatch_operands("dispatch_send", x, topk_ids, topk_weights, x_scale,
                                           num_tokens)
        send_tokens, send_index, link = self._differentiable("dispatch_send").dispatch_send(
            *operands)
        return PendingDispatch(send_tokens, send_index, operands[-1].reshape(1), link)

    def dispatch_recv(self, pending: PendingDispatch) -> Dispatched:
        """The second half of dispatch: waits for the peers and lays out the tokens."""
        if not isinstance(pending, PendingDispatch):
            raise TypeError("dispatch_recv takes what dispatch_send returned, got "
                            f"{type(pending).__name__}")
        recv = self._differentiable("dispatch_recv").dispatch_recv(
            *self._varying([pending.send_tokens, pending.grad_link]))
        return self._dispatched(pending.send_tokens, pending.send_index, pending.num_tokens, recv)

    # --- combine ---

    def combine(self, expert_y, handle: DispatchHandle):
        """Sends expert outputs back and sums them per token: [T, H] in combine_dtype.

        expert_y [max_recv_tokens, H] in combine_dtype, row for row like expert_x. Row t of
        the result is sum_i topk_weights[t, i] * (output of expert topk_ids[t, i] for token
        t); rows at and past num_tokens are zero.
        """
        self._check_expert_y("combine", expert_y, handle)
        h = handle
        return self._differentiable("combine").combine(*self._varying([
            expert_y, h.record_weights, h.recv_tokens, h.record_rows, h.home_offsets,
            h.send_tokens, h.send_index, h.num_tokens.reshape(())]))

    def combine_send(self, expert_y, handle: DispatchHandle) -> PendingCombine:
        """The first half of combine: reduces and sends the partial sums home."""
        self._check_expert_y("combine_send", expert_y, handle)
        h = handle
        sent, link = self._differentiable("combine_send").combine_send(*self._varying([
            expert_y, h.record_weights, h.recv_tokens, h.record_rows, h.home_offsets]))
        return PendingCombine(sent, handle, link)

    def combine_recv(self, pending: PendingCombine):
        """The second half of combine: waits for the partials and sums them, [T, H]."""
        if not isinstance(pending, PendingCombine):
            raise TypeError("combine_recv takes what combine_send returned, got "
                            f"{type(pending).__name__}")
        h = pending.handle
        return self._differentiable("combine_recv").combine_recv(*self._varying([
            pending.sent, pending.grad_link, h.send_tokens, h.send_index,
            h.num_tokens.reshape(())]))

    # --- helpers ---

    def _differentiable(self, method: str) -> autodiff.Gradients:
        if self._contexts is None:
            raise RuntimeError(f"{method}: this AllToAll is closed")
        return self._gradients

    def _call(self, op, method: str, *operands):
        """One custom call per rank. Operands and results are typed as varying over the axis
        (ffi_call does not derive it, and every rank's results differ whatever the operands
        were built from), so they fit shard_map's checks and fori_loop carries."""
        if self._contexts is None:
            raise RuntimeError(f"{method}: this AllToAll is closed")
        results = op(self._ops, *self._varying(operands))
        if isinstance(results, (list, tuple)):
            return self._varying(results)
        return self._varying([results])[0]

    def _varying(self, arrays) -> list:
        out = []
        for a in arrays:
            if self.axis_name in _config.varying_axes(a):
                out.append(a)
                continue
            try:
                out.append(jax.lax.pcast(a, self.axis_name, to="varying"))
            except NameError as e:
                raise ValueError(
                    f"AllToAll methods run per rank: call them inside jax.shard_map over "
                    f"{self.axis_name!r}") from e
        return out

    def _dispatched(self, send_tokens, send_index, num_tokens, recv) -> Dispatched:
        (expert_x, expert_x_scale, expert_counts, group_sizes, recv_tokens, record_rows,
         record_weights, home_offsets) = recv
        handle = DispatchHandle(send_tokens, send_index, num_tokens, recv_tokens, record_rows,
                                record_weights, home_offsets)
        return Dispatched(expert_x, expert_x_scale if self.has_scales else None,
                          expert_counts, group_sizes, handle)

    def _dispatch_operands(self, method, x, topk_ids, topk_weights, x_scale, num_tokens):
        x, x_scale, topk_ids, topk_weights, num_tokens = self.config.check_dispatch_inputs(
            method, x, topk_ids, topk_weights, x_scale, num_tokens)
        if x_scale is None:
            x_scale = jnp.zeros((self.max_tokens_per_rank, 0), jnp.float32)
        return self._varying([x, x_scale, topk_ids, topk_weights, num_tokens])

    def _check_expert_y(self, method, expert_y, handle):
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{method}: handle must be the DispatchHandle that dispatch "
                            f"returned, got {type(handle).__name__}")
        self.config.check_expert_y(method, expert_y)
