"""Reverse-mode gradients of AllToAll's dispatch and combine, and of their send/recv halves.

Each op is a ``jax.custom_vjp`` whose backward pass is the mirror exchange, run with the same
custom calls and the forward's handle, so it works wherever the forward does:

- **dispatch** copies each token to the rows of its experts; its transpose sums each token's
  row cotangents at home: a combine with weight 1 per slot. The same combine carries the
  float8 scales' cotangents and the router weights' home in extra columns.
- **combine** sums weighted expert rows at home; its transpose sends the output cotangent to
  every row its token went to (a dispatch of the cotangent), scales it by the row's router
  weight (-> expert_y), and dots it with the row's expert output (-> that slot's router weight:
  computed where the rows are, it costs k numbers per record on the way home, where
  recomputing it at home would need every slot's row sent home).
- The halves mirror each other, so the backward pass can overlap work as the forward does:
  dispatch_recv's backward is a combine_send, dispatch_send's a combine_recv; combine_recv's a
  dispatch_send, combine_send's a dispatch_recv. ``grad_link``, a float32 [R] array in the
  pending values (zeros in the forward pass), joins each pair: its cotangent carries the
  backward send half's counts to the backward recv half, which orders the two.

The backward pass runs on a second context of the same routing layout, so that the forward's
handle indexes its rows too: combine dtype both ways, H + H/128 + k columns (rounded up to 16).
Its steps are chained by data (XLA orders custom calls by data alone, and every rank must run
a context's steps in one order), and the forward's context keeps only the forward's steps.

topk_ids, num_tokens and the handle's integer arrays get no gradient (float0); -1 slots, rows
past num_tokens and alignment padding get zero cotangents. Cotangents travel in the combine
dtype. Float8 dispatch: the cotangent of x is returned in the combine dtype, not rounded to
float8 (JAX accepts a wider float cotangent for a float8 input; float8 would keep 3 mantissa
bits and flush every value below 2**-9), so x should come straight from a cast, as in
:func:`jax_efa_moe.moe.quantize_fp8` (JAX's rules for other ops on float8 values expect
float8 cotangents). With quantize_fp8 and :func:`~jax_efa_moe.moe.dequantize_fp8` around the
dispatch, quantisation is straight-through: the gradient of x is what a dispatch of the
unquantized x would give, evaluated at the quantized forward pass.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jax_efa_moe import ops

_F32 = jnp.dtype(jnp.float32)
_building = threading.local()  # .active: Gradients is opening its twin


def _zero(ct) -> bool:
    return isinstance(ct, SymbolicZero)


def _custom_vjp(primal, fwd, bwd):
    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def _values(primals):
    return [p.value for p in primals]


class Gradients:
    """The differentiable forms of one AllToAll's ops, and the twin their backward runs on."""

    @classmethod
    def open(cls, comm, differentiable: bool = True) -> Gradients | None:
        """None for the twins themselves: they are never differentiated. Without
        ``differentiable`` no twin is opened, and a backward pass raises."""
        return None if getattr(_building, "active", False) else cls(comm, differentiable)

    def __init__(self, comm, differentiable: bool = True):
        self.comm = comm
        self.twin = None
        if differentiable:
            cdt = comm.combine_dtype
            # The CUDA kernels move rows in 16-element blocks.
            extra = _round_up(comm.num_scales + comm.experts_per_token, 16)
            _building.active = True
            try:
                self.twin = _twin(comm, comm.hidden + extra, cdt)
            finally:
                _building.active = False
        self.dispatch = _custom_vjp(self._dispatch, self._dispatch_fwd, self._dispatch_bwd)
        self.dispatch_send = _custom_vjp(self._send, self._send_fwd, self._send_bwd)
        self.dispatch_recv = _custom_vjp(self._recv, self._recv_fwd, self._recv_bwd)
        self.combine = _custom_vjp(self._combine, self._combine_fwd, self._combine_bwd)
        self.combine_send = _custom_vjp(self._csend, self._csend_fwd, self._csend_bwd)
        self.combine_recv = _custom_vjp(self._crecv, self._crecv_fwd, self._crecv_bwd)

    def close(self) -> None:
        if self.twin is not None:
            self.twin.close()

    def raise_if_failed(self) -> None:
        if self.twin is not None:
            self.twin.raise_if_failed()

    def _backward(self):
        """The twin the backward pass runs on."""
        if self.twin is None:
            raise RuntimeError("this AllToAll was created with differentiable=False, so it has "
                               "no context for the backward pass; create it with "
                               "differentiable=True (the default) to take gradients.")
        return self.twin

    def _mirror(self, op, forward: str, *operands):
        """``op`` on the twin, as the backward pass of ``forward``."""
        return self._backward()._call(op, f"{op.__name__} (backward of {forward})", *operands)

    # --- dispatch: (x, x_scale, topk_ids, topk_weights, num_tokens) -> the ops' results ---

    def _dispatch(self, x, x_scale, topk_ids, topk_weights, num_tokens):
        return tuple(self.comm._call(ops.dispatch, "dispatch", x, x_scale, topk_ids,
                                     topk_weights, num_tokens))

    def _dispatch_fwd(self, *primals):
        x, x_scale, topk_ids, topk_weights, num_tokens = _values(primals)
        out = self._dispatch(x, x_scale, topk_ids, topk_weights, num_tokens)
        send_tokens, send_index, _, _, _, _, recv_tokens, record_rows, _, home_offsets = out
        return out, (send_tokens, send_index, num_tokens, recv_tokens, record_rows,
                     home_offsets)

    def _dispatch_bwd(self, res, cts):
        send_tokens, send_index, num_tokens, recv_tokens, record_rows, home_offsets = res
        if all(map(_zero, (cts[2], cts[3], cts[8]))):
            return (None,) * 5
        out = self._mirror(ops.combine, "dispatch",
                           self._home_rows(record_rows, cts[2], cts[3], cts[8]),
                           *_expert_side(recv_tokens, record_rows, home_offsets),
                           send_tokens, send_index, num_tokens)
        return self._home_cotangents(out)

    # --- dispatch_send: same operands -> (send_tokens, send_index, grad_link) ---

    def _send(self, x, x_scale, topk_ids, topk_weights, num_tokens):
        send_tokens, send_index = self.comm._call(ops.dispatch_send, "dispatch_send", x,
                                                  x_scale, topk_ids, topk_weights, num_tokens)
        return send_tokens, send_index, self._link()

    def _send_fwd(self, *primals):
        *_, num_tokens = args = _values(primals)
        out = self._send(*args)
        return out, (out[0], out[1], num_tokens)

    def _send_bwd(self, res, cts):
        send_tokens, send_index, num_tokens = res
        if _zero(cts[2]):
            return (None,) * 5
        out = self._mirror(ops.combine_recv, "dispatch_send", cts[2].astype(jnp.int32),
                           send_tokens, send_index, num_tokens)
        return self._home_cotangents(out)

    # --- dispatch_recv: (send_tokens, grad_link) -> dispatch's results past the first two ---

    def _recv(self, send_tokens, grad_link):
        del grad_link  # only its cotangent matters (the backward pass's order)
        return tuple(self.comm._call(ops.dispatch_recv, "dispatch_recv", send_tokens))

    def _recv_fwd(self, *primals):
        out = self._recv(*_values(primals))
        _, _, _, _, recv_tokens, record_rows, _, home_offsets = out
        return out, (recv_tokens, record_rows, home_offsets)

    def _recv_bwd(self, res, cts):
        recv_tokens, record_rows, home_offsets = res
        if all(map(_zero, (cts[0], cts[1], cts[6]))):
            return None, None
        sent = self._mirror(ops.combine_send, "dispatch_recv",
                            self._home_rows(record_rows, cts[0], cts[1], cts[6]),
                            *_expert_side(recv_tokens, record_rows, home_offsets))
        return None, sent.astype(_F32)

    # --- combine: (expert_y, record_weights, recv_tokens, record_rows, home_offsets,
    #               send_tokens, send_index, num_tokens) -> out [T, H] ---

    def _combine(self, expert_y, record_weights, recv_tokens, record_rows, home_offsets,
                 send_tokens, send_index, num_tokens):
        return self.comm._call(ops.combine, "combine", expert_y, recv_tokens, record_rows,
                               record_weights, home_offsets, send_tokens, send_index, num_tokens)

    def _combine_fwd(self, *primals):
        args = _values(primals)
        expert_y, record_weights, _, record_rows, _, send_tokens, send_index, num_tokens = args
        return self._combine(*args), (expert_y, record_weights, record_rows, send_tokens,
                                      send_index, num_tokens)

    def _combine_bwd(self, res, out_ct):
        expert_y, record_weights, record_rows, send_tokens, send_index, num_tokens = res
        if _zero(out_ct):
            return (None,) * 8
        recv = self._mirror(ops.dispatch, "combine",
                            *self._back_operands(out_ct, send_tokens, send_index, num_tokens))
        return (*self._expert_cotangents(recv[2:], expert_y, record_weights, record_rows),
                *(None,) * 6)

    # --- combine_send: (expert_y, record_weights, recv_tokens, record_rows, home_offsets)
    #                   -> (sent, grad_link) ---

    def _csend(self, expert_y, record_weights, recv_tokens, record_rows, home_offsets):
        sent = self.comm._call(ops.combine_send, "combine_send", expert_y, recv_tokens,
                               record_rows, record_weights, home_offsets)
        return sent, self._link()

    def _csend_fwd(self, *primals):
        expert_y, record_weights, _, record_rows, _ = args = _values(primals)
        return self._csend(*args), (expert_y, record_weights, record_rows)

    def _csend_bwd(self, res, cts):
        expert_y, record_weights, record_rows = res
        if _zero(cts[1]):
            return (None,) * 5
        recv = self._mirror(ops.dispatch_recv, "combine_send", cts[1].astype(jnp.int32))
        return (*self._expert_cotangents(recv, expert_y, record_weights, record_rows),
                None, None, None)

    # --- combine_recv: (sent, grad_link, send_tokens, send_index, num_tokens) -> out ---

    def _crecv(self, sent, grad_link, send_tokens, send_index, num_tokens):
        del grad_link  # only its cotangent matters (the backward pass's order)
        return self.comm._call(ops.combine_recv, "combine_recv", sent, send_tokens, send_index,
                               num_tokens)

    def _crecv_fwd(self, *primals):
        args = _values(primals)
        return self._crecv(*args), tuple(args[2:])

    def _crecv_bwd(self, res, out_ct):
        send_tokens, send_index, num_tokens = res
        if _zero(out_ct):
            return (None,) * 5
        sent, _ = self._mirror(ops.dispatch_send, "combine_recv",
                               *self._back_operands(out_ct, send_tokens, send_index, num_tokens))
        return None, sent.astype(_F32), None, None, None

    # --- helpers ---

    def _link(self):
        return self.comm._varying([jnp.zeros(self.comm.num_ranks, _F32)])[0]

    def _back_operands(self, out_ct, send_tokens, send_index, num_tokens):
        """dispatch operands that send combine's output cotangent to every row of its token.

        Each token gets one slot per destination rank of the forward dispatch (that rank's first
        expert). dispatch packs a rank's records in token order, so these make the forward's
        records in the forward's order: record g here is record g of the handle, without
        topk_ids. Router weights are not needed (zeros)."""
        comm = self.comm
        T, H, k = comm.max_tokens_per_rank, comm.hidden, comm.experts_per_token
        dest = jnp.searchsorted(jnp.cumsum(send_tokens), send_index, side="right")
        ids = jnp.where(send_index >= 0, dest * comm.local_experts, -1).astype(jnp.int32)
        twin_hidden = self._backward().hidden
        rows = jnp.pad(out_ct.astype(comm.combine_dtype), ((0, 0), (0, twin_hidden - H)))
        return rows, jnp.zeros((T, 0), _F32), ids, jnp.zeros((T, k), _F32), num_tokens

    def _expert_cotangents(self, recv, expert_y, record_weights, record_rows):
        """(expert_y, record_weights) cotangents from the rows of combine's backward dispatch."""
        comm = self.comm
        M, H = comm.max_recv_tokens, comm.hidden
        rows, back_rows = recv[0], recv[5]
        # The one row each record was expanded to by the backward dispatch, for every slot of
        # that record on this rank; rows past num_tokens, padding and unused rows: none (M).
        source = jnp.max(back_rows, axis=1)
        source = jnp.where(source >= 0, source, M)
        target = jnp.where(record_rows >= 0, record_rows, M)
        source_of_row = jnp.full(M, M, jnp.int32).at[target].set(
            jnp.broadcast_to(source[:, None], target.shape), mode="drop")
        weight_of_row = jnp.zeros(M, _F32).at[target].set(record_weights, mode="drop")
        # Kept in the combine dtype: on the CPU, writing [M, H] in float32 costs more than the
        # products themselves.
        out_ct = jnp.take(rows[:, :H], source_of_row, axis=0, mode="fill", fill_value=0)
        y_ct = (out_ct.astype(_F32) * weight_of_row[:, None]).astype(comm.combine_dtype)
        dots = jnp.einsum("mh,mh->m", out_ct, expert_y, preferred_element_type=_F32)
        return y_ct, jnp.take(dots, target, mode="fill", fill_value=0)

    def _home_rows(self, record_rows, x_ct, scale_ct, weights_ct):
        """expert_y of the combine that takes dispatch's cotangents home: the rows' in the first
        H columns, their scales' in the next S, and slot i's router weight's in column
        H + S + i of that slot's row only, so that the combine's sum over a record's slots
        keeps it."""
        comm = self.comm
        M, H, k, S = comm.max_recv_tokens, comm.hidden, comm.experts_per_token, \
            comm.num_scales
        rows = (jnp.zeros((M, H), comm.combine_dtype) if _zero(x_ct)
                else x_ct.astype(comm.combine_dtype))
        extra = jnp.zeros((M, self._backward().hidden - H), _F32)
        if not _zero(scale_ct):
            extra = extra.at[:, :S].set(scale_ct)
        if not _zero(weights_ct):
            target = jnp.where(record_rows >= 0, record_rows, M)
            extra = extra.at[target, S + jnp.arange(k)].set(weights_ct, mode="drop")
        return jnp.concatenate([rows, extra.astype(comm.combine_dtype)], axis=1)

    def _home_cotangents(self, out):
        """Cotangents of (x, x_scale, topk_ids, topk_weights, num_tokens) from the combine of
        _home_rows."""
        comm = self.comm
        H, S, k = comm.hidden, comm.num_scales, comm.experts_per_token
        x_ct = out[:, :H]
        if not comm.has_scales:  # float8 keeps the combine dtype (see the module's doc)
            x_ct = x_ct.astype(comm.dispatch_dtype)
        return (x_ct, out[:, H:H + S].astype(_F32), None,
                out[:, H + S:H + S + k].astype(_F32), None)


def _expert_side(recv_tokens, record_rows, home_offsets):
    """The expert-side handle arrays of a combine that sums each record's slots unweighted."""
    return recv_tokens, record_rows, (record_rows >= 0).astype(_F32), home_offsets


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _twin(comm, hidden: int, dtype):
    """An AllToAll with comm's routing layout, ``hidden`` columns, dispatching and combining
    ``dtype``."""
    return type(comm)(
        comm.mesh, comm.axis_name, num_experts=comm.num_experts,
        experts_per_token=comm.experts_per_token, hidden=hidden,
        max_tokens_per_rank=comm.max_tokens_per_rank, dispatch_dtype=dtype,
        combine_dtype=dtype, max_recv_tokens=comm.max_recv_tokens,
        expert_alignment=comm.expert_alignment, zero_unused_rows=comm.zero_unused_rows,
        max_sms=comm.max_sms, timeout_s=comm.timeout_s, **comm.transport_options)
