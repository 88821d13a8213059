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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_efa_moe import autodiff, ops

_DISPATCH_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn)
_COMBINE_DTYPES = (jnp.bfloat16, jnp.float32)
_SCALE_BLOCK = 128
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
    handle: DispatchHandle


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


def _backend_contexts(platform: str, mesh, axis_name, layout, *, fabric_provider, timeout_s,
                      ranks_per_node, transport):
    """The per-platform part of set-up: contexts for this process's ranks."""
    if platform == "cpu":
        if transport == "nvlink":
            raise ValueError("transport='nvlink' needs GPUs; on the CPU every peer is reached "
                             "through the fabric (transport='auto' or 'fabric').")
        from jax_efa_moe.cpu_contexts import CpuContexts

        return CpuContexts(mesh, axis_name, layout, fabric_provider=fabric_provider,
                           timeout_s=timeout_s)
    if platform == "gpu":
        R = mesh.shape[axis_name]
        if transport == "fabric" or (ranks_per_node is not None and ranks_per_node != R):
            raise ValueError("on GPUs this build reaches peers over NVLink only: every rank "
                             "must be on one node (ranks_per_node=None or equal to the ranks, "
                             "transport='auto' or 'nvlink').")
        from jax_efa_moe.cuda_contexts import CudaContexts

        return CudaContexts(mesh, axis_name, layout, timeout_s=timeout_s)
    raise ValueError(f"AllToAll has no backend for devices of platform '{platform}' in this "
                     "build.")


class AllToAll:
    """Expert-parallel dispatch and combine over the ranks of ``mesh`` along ``axis_name``.

    Rank r holds experts [r * L, (r + 1) * L), L = num_experts / ranks. ``max_recv_tokens``
    bounds the rows of ``expert_x``; the default fits any routing. ``timeout_s`` bounds every
    wait on a peer: a dead peer becomes an error, never a hang. After an error the instance
    refuses further calls; create a new one.

    For gradients it opens a second context beside its own, where the backward pass runs:
    the same routing layout, combine dtype both ways, H + H/128 + k columns (rounded up to 16).
    """

    def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, *, num_experts: int,
                 experts_per_token: int, hidden: int, max_tokens_per_rank: int,
                 dispatch_dtype: Any = jnp.bfloat16, combine_dtype: Any = jnp.bfloat16,
                 max_recv_tokens: int | None = None, expert_alignment: int = 1,
                 ranks_per_node: int | None = None, transport: str = "auto",
                 fabric_provider: str | None = None, timeout_s: float = 60.0):
        from jax_efa_moe import _jem

        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                             f"{mesh.axis_names}")
        R = mesh.shape[axis_name]
        _positive("num_experts", num_experts)
        _positive("experts_per_token", experts_per_token)
        _positive("hidden", hidden)
        _positive("max_tokens_per_rank", max_tokens_per_rank)
        _positive("expert_alignment", expert_alignment)
        if num_experts % R:
            raise ValueError(f"num_experts = {num_experts} must be a multiple of the "
                             f"{R} ranks along {axis_name!r}")
        if experts_per_token > num_experts:
            raise ValueError(f"experts_per_token = {experts_per_token} exceeds num_experts = "
                             f"{num_experts}")
        self.dispatch_dtype = _dtype("dispatch_dtype", dispatch_dtype, _DISPATCH_DTYPES)
        self.combine_dtype = _dtype("combine_dtype", combine_dtype, _COMBINE_DTYPES)
        self.has_scales = self.dispatch_dtype == jnp.float8_e4m3fn
        if self.has_scales and hidden % _SCALE_BLOCK:
            raise ValueError(f"float8 dispatch carries one scale per {_SCALE_BLOCK} channels, "
                             f"so hidden = {hidden} must be a multiple of {_SCALE_BLOCK}")
        if ranks_per_node is not None:
            _positive("ranks_per_node", ranks_per_node)
            if R % ranks_per_node:
                raise ValueError(f"ranks_per_node = {ranks_per_node} must divide the {R} ranks")
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")

        if max_recv_tokens is None:
            max_recv_tokens = _jem.Layout.default_max_recv_tokens(
                R, num_experts, experts_per_token, max_tokens_per_rank, expert_alignment)
        _positive("max_recv_tokens", max_recv_tokens)

        layout = _jem.Layout()
        layout.num_ranks = R
        layout.num_experts = num_experts
        layout.experts_per_token = experts_per_token
        layout.hidden = hidden
        layout.max_tokens = max_tokens_per_rank
        layout.max_recv_tokens = max_recv_tokens
        layout.expert_alignment = expert_alignment
        layout.dispatch_elem_bytes = self.dispatch_dtype.itemsize
        layout.combine_elem_bytes = self.combine_dtype.itemsize
        layout.has_scales = self.has_scales

        self.mesh, self.axis_name = mesh, axis_name
        self.num_ranks, self.num_experts = R, num_experts
        self.local_experts = num_experts // R
        self.experts_per_token, self.hidden = experts_per_token, hidden
        self.max_tokens_per_rank, self.max_recv_tokens = max_tokens_per_rank, max_recv_tokens
        self.expert_alignment, self.timeout_s = expert_alignment, timeout_s
        self.ranks_per_node, self.transport = ranks_per_node, transport

        platform = mesh.devices.flat[0].platform
        self._contexts = _backend_contexts(
            platform, mesh, axis_name, layout, fabric_provider=fabric_provider,
            timeout_s=timeout_s, ranks_per_node=ranks_per_node, transport=transport)
        self.rank = self._contexts.rank
        self.fabric_provider = self._contexts.provider
        self._ops = ops.OpConfig(
            context=self._contexts.context_id, num_ranks=R, local_experts=self.local_experts,
            experts_per_token=experts_per_token, hidden=hidden, max_tokens=max_tokens_per_rank,
            max_recv_tokens=max_recv_tokens, max_recv_records=layout.max_recv_records(),
            num_scales=layout.num_scales(), dispatch_dtype=self.dispatch_dtype,
            combine_dtype=self.combine_dtype)
        self._gradients = None
        try:
            self._gradients = autodiff.Gradients.open(self)
        except BaseException:
            self.close()
            raise

    # --- lifetime ---

    def close(self) -> None:
        """Releases the buffers and the engine. Idempotent; finish running steps first."""
        if self._gradients is not None:
            self._gradients.close()
            self._gradients = None
        if self._contexts is not None:
            self._contexts.close()
            self._contexts = None

    def raise_if_failed(self) -> None:
        """Raises the first error a step reported, if any. On GPUs the kernels report errors
        (bad expert ids, num_tokens, capacity, a silent peer) without stopping the host: call
        this after ``jax.block_until_ready``; the next call of this AllToAll also raises it.
        On the CPU steps raise at once, so this never raises there."""
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
            if self.axis_name in _varying_axes(a):
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
        T, H, k = self.max_tokens_per_rank, self.hidden, self.experts_per_token
        _check_array(method, "x", x, (T, H), self.dispatch_dtype)
        _check_array(method, "topk_ids", topk_ids, (T, k), jnp.int32)
        _check_array(method, "topk_weights", topk_weights, (T, k), jnp.float32)
        if self.has_scales:
            if x_scale is None:
                raise ValueError(f"{method}: float8 dispatch needs x_scale, float32 "
                                 f"[{T}, {H // _SCALE_BLOCK}] (one scale per 128 channels)")
            _check_array(method, "x_scale", x_scale, (T, H // _SCALE_BLOCK), jnp.float32)
        else:
            if x_scale is not None:
                raise ValueError(f"{method}: x_scale is only for float8 dispatch; this "
                                 f"AllToAll dispatches {self.dispatch_dtype.name}")
            x_scale = jnp.zeros((T, 0), jnp.float32)
        if num_tokens is None:
            num_tokens = T
        if isinstance(num_tokens, (int, np.integer)):
            if not 0 <= num_tokens <= T:
                raise ValueError(f"{method}: num_tokens = {num_tokens} is outside "
                                 f"[0, max_tokens_per_rank = {T}]")
            num_tokens = jnp.asarray(num_tokens, jnp.int32)
        else:
            _check_array(method, "num_tokens", num_tokens, (), jnp.int32)
        return self._varying([x, x_scale, topk_ids, topk_weights, num_tokens])

    def _check_expert_y(self, method, expert_y, handle):
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{method}: handle must be the DispatchHandle that dispatch "
                            f"returned, got {type(handle).__name__}")
        _check_array(method, "expert_y", expert_y, (self.max_recv_tokens, self.hidden),
                     self.combine_dtype)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # named vma before jax 0.10
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _positive(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _dtype(name: str, value, allowed) -> np.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise TypeError(f"{name} {value!r} is not a dtype") from e
    if dtype not in [jnp.dtype(a) for a in allowed]:
        raise TypeError(f"{name} must be one of {[jnp.dtype(a).name for a in allowed]}, got "
                        f"{dtype.name}")
    return dtype


def _check_array(method: str, name: str, value, shape: tuple, dtype) -> None:
    got_shape = getattr(value, "shape", None)
    got_dtype = getattr(value, "dtype", None)
    if got_shape is None or got_dtype is None:
        raise TypeError(f"{method}: {name} must be an array, got {type(value).__name__}")
    if tuple(got_shape) != tuple(shape):
        raise ValueError(f"{method}: {name} has shape {tuple(got_shape)}, expected "
                         f"{tuple(shape)} per rank (inside shard_map over the AllToAll's axis)")
    if jnp.dtype(got_dtype) != jnp.dtype(dtype):
        raise TypeError(f"{method}: {name} has dtype {jnp.dtype(got_dtype).name}, expected "
                        f"{jnp.dtype(dtype).name}")
