"""Pure-JAX expert-parallel dispatch/combine, built the MaxText way: the stock baseline.

Each rank sorts its token copies (one per (token, slot)) by expert, exchanges them with
``jax.lax.ragged_all_to_all`` across the EP axis, then permutes the received rows into the
per-expert layout; combine runs the same path backwards and takes the weighted sum at home.
It has the interface and outputs of :class:`jax_efa_moe.AllToAll`, so tests use it as an
oracle and benchmarks swap it in::

    comm = ReferenceAllToAll(mesh, "ep", num_experts=32, experts_per_token=4, hidden=512,
                             max_tokens_per_rank=64)
    # inside jax.shard_map over "ep", per-rank shapes:
    d = comm.dispatch(x, topk_ids, topk_weights)
    y = experts(d.expert_x, d.group_sizes)
    out = comm.combine(y, d.handle)

XLA:CPU has no ``ragged-all-to-all`` (jax 0.10.2 fails with "HLO opcode `ragged-all-to-all`
is not supported by XLA:CPU ThunkEmitter", in one process with several host devices and
across processes alike). On CPU meshes the ragged exchange is therefore carried by a padded
``jax.lax.all_to_all`` (every rank sends a fixed-capacity block per peer), which gloo runs
across processes. On GPUs with one process per GPU, XLA (jax 0.11.2) rejects
``ragged_all_to_all`` as multi-host unless
``--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true`` is in ``XLA_FLAGS``. :class:`PaddedAllToAll` uses that padded exchange on every platform: it is
the second stock baseline.

Differences from the real AllToAll, by design of the stock path: a token crosses the wire
once per (token, expert) pair rather than once per destination rank; combine sends each
expert's output row home and weights it there (the real one sends weighted partial sums).

Gradients are JAX's own (the tests' oracle for AllToAll's), except that float8 rows, moved as
bytes, pass cotangents in a wider float dtype as AllToAll's do.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_efa_moe.api import Dispatched
from jax_efa_moe.config import (AllToAllConfig, ConfigAttributes, axis_size, check_bool,
                                 varying_axes)


class DispatchHandle(NamedTuple):
    """Routing state that combine needs to send rows home and weight them."""
    inverse_order: jax.Array     # i32 [T*k]: sorted position of each (token, slot) copy
    weights: jax.Array           # f32 [T, k]: router weights, 0 for unused slots
    send_sizes: jax.Array        # i32 [R]: copies sent to each rank
    input_offsets: jax.Array     # i32 [R]: where each rank's copies start in sorted order
    recv_sizes: jax.Array        # i32 [R]: copies received from each rank
    recv_offsets: jax.Array      # i32 [R]: where they start in the compact receive buffer
    home_offsets: jax.Array      # i32 [R]: where rank s keeps the copies it sent here
    received_rows: jax.Array     # i32: expert_x row of each received row (M = none)
    sorted_dest: jax.Array       # i32 [T*k]: padded-layout slot of each sorted copy


class PendingDispatch(NamedTuple):
    """Between dispatch_send and dispatch_recv: the rows as received, not yet permuted."""
    received_x: jax.Array
    received_scale: Any
    expert_counts: jax.Array
    group_sizes: jax.Array
    handle: DispatchHandle


class PendingCombine(NamedTuple):
    """Between combine_send and combine_recv: expert rows back home, in sorted order."""
    sorted_y: jax.Array
    handle: DispatchHandle


def _bytewise(fn, a, *args):
    """fn(a, *args) for fn linear in a, a map of rows. float8 rows go through as their bytes
    (the same data, and XLA:CPU moves uint8 far faster); their gradient is fn's transpose in the
    cotangent's dtype, as float8 would keep 3 mantissa bits and flush every value below 2**-9
    (JAX accepts a wider float cotangent for a float8 input)."""
    if a.dtype != jnp.dtype(jnp.float8_e4m3fn):
        return fn(a, *args)
    shape, vma = a.shape, tuple(varying_axes(a))

    @jax.custom_vjp
    def moved(a, *args):
        out = fn(jax.lax.bitcast_convert_type(a, jnp.uint8), *args)
        return jax.lax.bitcast_convert_type(out, a.dtype)

    def bwd(args, ct):
        # The cotangent varies over the same mesh axes as `a` (ragged_all_to_all's output
        # buffer, for one, does not).
        zero = jnp.zeros(shape, ct.dtype)
        if vma:
            zero = jax.lax.pcast(zero, vma, to="varying")
        return (*jax.vjp(lambda v: fn(v, *args), zero)[1](ct), *(None,) * len(args))

    moved.defvjp(lambda a, *args: (moved(a, *args), args), bwd)
    return moved(a, *args)


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


class ReferenceAllToAll(ConfigAttributes):
    """Dispatch/combine with stock JAX collectives; same interface as ``AllToAll``, and the
    same configuration (``self.config``, checked the same way).

    ``exchange``: "ragged" (``jax.lax.ragged_all_to_all``), "padded" (``jax.lax.all_to_all``
    of fixed-capacity blocks) or "auto" (ragged, except on CPU where XLA lacks it).
    ``check``: raise (through a host callback) on expert ids outside [-1, E), ``num_tokens``
    outside [0, T], or routing that needs more than ``max_recv_tokens`` rows on some rank. The
    callback costs a device-to-host sync, so benchmarks turn it off; unchecked, such routing
    leaves the received rows zero and bad ids are treated as unused slots.
    """

    def __init__(self, mesh, axis_name, *, num_experts, experts_per_token, hidden,
                 max_tokens_per_rank, dispatch_dtype=jnp.bfloat16,
                 combine_dtype=jnp.bfloat16, max_recv_tokens=None, expert_alignment=1,
                 exchange="auto", check=True):
        self.config = AllToAllConfig(
            num_ranks=axis_size(mesh, axis_name), num_experts=num_experts,
            experts_per_token=experts_per_token, hidden=hidden,
            max_tokens_per_rank=max_tokens_per_rank, dispatch_dtype=dispatch_dtype,
            combine_dtype=combine_dtype, max_recv_tokens=max_recv_tokens,
            expert_alignment=expert_alignment)
        if exchange not in ("auto", "ragged", "padded"):
            raise ValueError(f"exchange must be 'auto', 'ragged' or 'padded', got {exchange!r}")
        self.mesh, self.axis_name = mesh, axis_name
        # Padded blocks hold every copy one rank can send to one peer (k of them per token when
        # a router repeats an expert).
        self.capacity = min(self.max_tokens_per_rank * self.experts_per_token,
                            self.max_recv_tokens)
        platform = np.asarray(mesh.devices).flat[0].platform
        if exchange == "auto":
            exchange = "padded" if platform == "cpu" else "ragged"
        self.exchange = exchange
        self.check = check_bool("check", check)

    def close(self):
        """Nothing to release; present so that callers can treat both APIs alike."""

    # ---- dispatch -------------------------------------------------------------------------

    def dispatch(self, x, topk_ids, topk_weights, *, x_scale=None, num_tokens=None):
        return self.dispatch_recv(self.dispatch_send(x, topk_ids, topk_weights,
                                                     x_scale=x_scale, num_tokens=num_tokens))

    def dispatch_send(self, x, topk_ids, topk_weights, *, x_scale=None, num_tokens=None):
        """Routes, sorts copies by expert and exchanges them; returns a PendingDispatch."""
        x, x_scale, topk_ids, topk_weights, num_tokens = self.config.check_dispatch_inputs(
            "dispatch_send", x, topk_ids, topk_weights, x_scale, num_tokens)
        R, L, T, k = self.num_ranks, self.local_experts, self.max_tokens_per_rank, \
            self.experts_per_token
        E, M = self.num_experts, self.max_recv_tokens
        me = jax.lax.axis_index(self.axis_name)

        in_range = (topk_ids >= -1) & (topk_ids < E)
        valid = ((jnp.arange(T)[:, None] < num_tokens) & (topk_ids >= 0) & in_range)
        key = jnp.where(valid, topk_ids, E).reshape(-1)
        order = jnp.argsort(key, stable=True).astype(jnp.int32)
        sorted_key = key[order]
        inverse_order = jnp.zeros(T * k, jnp.int32).at[order].set(jnp.arange(T * k, dtype=jnp.int32))

        # Every rank learns every rank's per-expert counts: all offsets follow from them.
        counts = jnp.zeros(E + 1, jnp.int32).at[key].add(1)[:E]
        all_counts = jax.lax.all_gather(counts, self.axis_name).reshape(R, R, L)  # [src, dst, l]
        pair = all_counts.sum(-1)                                                   # [src, dst]
        groups_all = self._round_up(all_counts.sum(0))                              # [dst, l]
        overflow = jnp.any(groups_all.sum(-1) > M)
        if self.check:
            bad_ids = jnp.any((jnp.arange(T)[:, None] < num_tokens) & ~in_range)
            jax.debug.callback(self._raise_on_bad_input, overflow, bad_ids, num_tokens,
                               groups_all.sum(-1))
        # On overflow nothing is sent, so no write can land outside the buffers.
        keep = jnp.where(overflow, 0, 1).astype(jnp.int32)

        send_sizes = pair[me] * keep
        input_offsets = _exclusive_cumsum(pair[me])
        output_offsets = _exclusive_cumsum(pair, axis=0)[me]
        recv_counts = all_counts[:, me, :]                                          # [src, l]
        recv_sizes = recv_counts.sum(-1) * keep
        recv_offsets = _exclusive_cumsum(recv_counts.sum(-1))
        home_offsets = _exclusive_cumsum(pair, axis=1)[:, me]
        expert_counts = recv_counts.sum(0)
        group_sizes = groups_all[me]

        # Compact received row j belongs to block (src, l) of the src-major, expert-minor order;
        # its expert_x row is the expert's start, plus earlier senders' rows, plus its rank.
        flat = recv_counts.reshape(-1)
        j = jnp.arange(M, dtype=jnp.int32)
        block = jnp.minimum(jnp.searchsorted(jnp.cumsum(flat), j, side="right"), R * L - 1)
        within = j - _exclusive_cumsum(flat)[block]
        src, local = block // L, block % L
        before_src = _exclusive_cumsum(recv_counts, axis=0)[src, local]
        rows = _exclusive_cumsum(group_sizes)[local] + before_src + within
        compact_rows = jnp.where((j < recv_sizes.sum()) & (keep > 0), rows, M).astype(jnp.int32)

        tok = order // k
        sorted_dest = jnp.where(sorted_key < E, sorted_key // L, R)
        slot = jnp.arange(T * k, dtype=jnp.int32) - input_offsets[jnp.minimum(sorted_dest, R - 1)]
        sorted_dest = jnp.where(sorted_dest < R, sorted_dest * self.capacity + slot,
                                R * self.capacity).astype(jnp.int32)
        if self.exchange == "ragged":
            received_rows = compact_rows
            offsets = (input_offsets, send_sizes, output_offsets, recv_sizes)
            exchange = lambda a, *offsets: jax.lax.ragged_all_to_all(
                a, jnp.zeros((M,) + a.shape[1:], a.dtype), *offsets, axis_name=self.axis_name)
        else:
            c = jnp.arange(self.capacity, dtype=jnp.int32)
            compact = recv_offsets[:, None] + c[None, :]
            received_rows = jnp.where(c[None, :] < recv_sizes[:, None],
                                      compact_rows[jnp.minimum(compact, M - 1)], M).reshape(-1)
            offsets = (input_offsets, send_sizes)
            exchange = lambda a, *offsets: self._padded_exchange(a, *offsets)

        handle = DispatchHandle(inverse_order,
                                jnp.where(valid, topk_weights, 0.0).astype(jnp.float32),
                                send_sizes, input_offsets, recv_sizes, recv_offsets,
                                home_offsets, received_rows, sorted_dest)
        received_x = _bytewise(lambda a, tok, *offsets: exchange(a[tok], *offsets), x, tok,
                               *offsets)
        received_scale = exchange(x_scale[tok], *offsets) if self.has_scales else None
        return PendingDispatch(received_x, received_scale, expert_counts, group_sizes, handle)

    def dispatch_recv(self, pending):
        """Permutes the received rows into the per-expert layout; returns Dispatched."""
        h = pending.handle
        M = self.max_recv_tokens
        n = h.received_rows.shape[0]
        source = jnp.full(M, n, jnp.int32).at[h.received_rows].set(
            jnp.arange(n, dtype=jnp.int32), mode="drop")
        place = lambda a, source: jnp.take(a, source, axis=0, mode="fill", fill_value=0)
        expert_x = _bytewise(place, pending.received_x, source)
        return Dispatched(expert_x,
                          place(pending.received_scale, source) if self.has_scales else None,
                          pending.expert_counts, pending.group_sizes, h)

    # ---- combine --------------------------------------------------------------------------

    def combine(self, expert_y, handle):
        return self.combine_recv(self.combine_send(expert_y, handle))

    def combine_send(self, expert_y, handle):
        """Sends each received row's expert output back to its home rank."""
        self.config.check_expert_y("combine_send", expert_y)
        H = self.hidden
        h = handle
        rows = jnp.take(expert_y, h.received_rows, axis=0, mode="fill", fill_value=0)
        Tk = self.max_tokens_per_rank * self.experts_per_token
        if self.exchange == "ragged":
            sorted_y = jax.lax.ragged_all_to_all(
                rows, jnp.zeros((Tk, H), rows.dtype), h.recv_offsets, h.recv_sizes,
                h.home_offsets, h.send_sizes, axis_name=self.axis_name)
        else:
            blocks = jax.lax.all_to_all(rows.reshape(self.num_ranks, self.capacity, H),
                                        self.axis_name, 0, 0, tiled=False)
            sorted_y = jnp.take(blocks.reshape(-1, H), h.sorted_dest, axis=0, mode="fill",
                                fill_value=0)
        return PendingCombine(sorted_y, h)

    def combine_recv(self, pending):
        """Weights each token's k expert rows with its router weights and sums them in fp32."""
        h = pending.handle
        T, k = self.max_tokens_per_rank, self.experts_per_token
        y = pending.sorted_y[h.inverse_order].reshape(T, k, self.hidden).astype(jnp.float32)
        return jnp.einsum("tk,tkh->th", h.weights, y).astype(self.combine_dtype)

    # ---- helpers --------------------------------------------------------------------------

    def _round_up(self, counts):
        a = self.expert_alignment
        return (counts + a - 1) // a * a

    def _padded_exchange(self, a, input_offsets, send_sizes):
        """One fixed-capacity block per peer through jax.lax.all_to_all; [R*capacity, ...]."""
        R, C = self.num_ranks, self.capacity
        c = jnp.arange(C, dtype=jnp.int32)
        index = jnp.where(c[None, :] < send_sizes[:, None], input_offsets[:, None] + c[None, :],
                          a.shape[0])
        blocks = jnp.take(a, index.reshape(-1), axis=0, mode="fill", fill_value=0)
        blocks = jax.lax.all_to_all(blocks.reshape((R, C) + a.shape[1:]), self.axis_name, 0, 0,
                                    tiled=False)
        return blocks.reshape((R * C,) + a.shape[1:])

    def _raise_on_bad_input(self, overflow, bad_ids, num_tokens, rows_needed):
        if bad_ids:
            raise ValueError(f"topk_ids holds an expert id outside [-1, {self.num_experts})")
        if not 0 <= int(num_tokens) <= self.max_tokens_per_rank:
            raise ValueError(f"num_tokens={int(num_tokens)} is outside [0, "
                             f"{self.max_tokens_per_rank}]")
        if overflow:
            raise ValueError(f"the routing needs {np.asarray(rows_needed).tolist()} rows per rank, "
                             f"more than max_recv_tokens={self.max_recv_tokens}")


class PaddedAllToAll(ReferenceAllToAll):
    """The same path with a padded ``jax.lax.all_to_all`` exchange on every platform."""

    def __init__(self, mesh, axis_name, **kwargs):
        super().__init__(mesh, axis_name, exchange="padded", **kwargs)
