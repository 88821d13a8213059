"""The XLA FFI custom calls of cc/ffi/README.md, as jit-able functions of per-rank arrays.

Each wrapper is a ``jax.ffi.ffi_call`` with ``has_side_effect=True`` (the calls move data
between ranks, so XLA must neither drop nor merge them). Targets are registered once per
process, on first use.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

_registered = False
_register_lock = threading.Lock()


def register_targets() -> None:
    """Registers the handlers of every platform this build has, once per process."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from jax_efa_moe import _jem

        for name, capsule in _jem.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _registered = True


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Static facts the calls need: the context id and every per-rank shape."""

    context: int
    num_ranks: int             # R
    local_experts: int         # L
    experts_per_token: int     # k
    hidden: int                # H
    max_tokens: int            # T
    max_recv_tokens: int       # M
    max_recv_records: int      # N
    num_scales: int            # S: hidden // 128 for float8 dispatch, else 0
    dispatch_dtype: np.dtype
    combine_dtype: np.dtype


def _i32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _send_results(c: OpConfig):
    return (_i32(c.num_ranks),                           # send_tokens
            _i32(c.max_tokens, c.experts_per_token))     # send_index


def _recv_results(c: OpConfig):
    M, N, k = c.max_recv_tokens, c.max_recv_records, c.experts_per_token
    return (jax.ShapeDtypeStruct((M, c.hidden), c.dispatch_dtype),   # expert_x
            _f32(M, c.num_scales),                                   # expert_x_scale
            _i32(c.local_experts),                                   # expert_counts
            _i32(c.local_experts),                                   # group_sizes
            _i32(c.num_ranks),                                       # recv_tokens
            _i32(N, k),                                              # record_rows
            _f32(N, k),                                              # record_weights
            _i32(c.num_ranks))                                       # home_offsets


def _out(c: OpConfig) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((c.max_tokens, c.hidden), c.combine_dtype)


def _call(name: str, results, c: OpConfig, *operands):
    register_targets()
    return jax.ffi.ffi_call(name, results, has_side_effect=True)(
        *operands, context=np.int64(c.context))


def dispatch_send(c: OpConfig, x, x_scale, topk_ids, topk_weights, num_tokens):
    """-> (send_tokens [R], send_index [T, k])."""
    return _call("jem_dispatch_send", _send_results(c), c,
                 x, x_scale, topk_ids, topk_weights, num_tokens)


def dispatch_recv(c: OpConfig, send_tokens):
    """-> (expert_x, expert_x_scale, expert_counts, group_sizes, recv_tokens, record_rows,
    record_weights, home_offsets)."""
    return _call("jem_dispatch_recv", _recv_results(c), c, send_tokens)


def dispatch(c: OpConfig, x, x_scale, topk_ids, topk_weights, num_tokens):
    """-> the results of dispatch_send, then those of dispatch_recv."""
    return _call("jem_dispatch", _send_results(c) + _recv_results(c), c,
                 x, x_scale, topk_ids, topk_weights, num_tokens)


def combine_send(c: OpConfig, expert_y, recv_tokens, record_rows, record_weights, home_offsets):
    """-> sent [R]."""
    return _call("jem_combine_send", _i32(c.num_ranks), c,
                 expert_y, recv_tokens, record_rows, record_weights, home_offsets)


def combine_recv(c: OpConfig, sent, send_tokens, send_index, num_tokens):
    """-> out [T, H]."""
    return _call("jem_combine_recv", _out(c), c, sent, send_tokens, send_index, num_tokens)


def combine(c: OpConfig, expert_y, recv_tokens, record_rows, record_weights, home_offsets,
            send_tokens, send_index, num_tokens):
    """-> out [T, H]."""
    return _call("jem_combine", _out(c), c, expert_y, recv_tokens, record_rows, record_weights,
                 home_offsets, send_tokens, send_index, num_tokens)
