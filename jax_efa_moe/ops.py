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

from jax_efa_moe.config import AllToAllConfig

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
        if _jem.has_cuda:
            for name, capsule in _jem.cuda_registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Static facts the calls need: the context id (their attribute) and the configuration,
    from which every per-rank shape follows (N through the C++ Layout)."""

    context: int
    config: AllToAllConfig


def _i32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _send_results(cfg: AllToAllConfig):
    return (_i32(cfg.num_ranks),                                    # send_tokens
            _i32(cfg.max_tokens_per_rank, cfg.experts_per_token))   # send_index


def _recv_results(cfg: AllToAllConfig):
    M, N, k = cfg.max_recv_tokens, cfg.max_recv_records, cfg.experts_per_token
    return (jax.ShapeDtypeStruct((M, cfg.hidden), cfg.dispatch_dtype),   # expert_x
            _f32(M, cfg.num_scales),                                       # expert_x_scale
            _i32(cfg.local_experts),                                       # expert_counts
            _i32(cfg.local_experts),                                       # group_sizes
            _i32(cfg.num_ranks),                                           # recv_tokens
            _i32(N, k),                                                    # record_rows
            _f32(N, k),                                                    # record_weights
            _i32(cfg.num_ranks))                                           # home_offsets


def _out(cfg: AllToAllConfig) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((cfg.max_tokens_per_rank, cfg.hidden), cfg.combine_dtype)


def _call(name: str, results, op: OpConfig, *operands):
    register_targets()
    # XLA:GPU's dynamic-slice fusion moves a copy of a custom call that reads a dynamic slice
    # or feeds a dynamic-update-slice (a scan stacking its outputs) into a fusion, and keeps
    # the original, which has side effects: each step would run the call twice. Optimization
    # barriers on both sides hide those slices from it.
    operands = jax.lax.optimization_barrier(operands)
    out = jax.ffi.ffi_call(name, results, has_side_effect=True)(
        *operands, context=np.int64(op.context))
    return jax.lax.optimization_barrier(out)


def dispatch_send(op: OpConfig, x, x_scale, topk_ids, topk_weights, num_tokens):
    """-> (send_tokens [R], send_index [T, k])."""
    return _call("jem_dispatch_send", _send_results(op.config), op,
                 x, x_scale, topk_ids, topk_weights, num_tokens)


def dispatch_recv(op: OpConfig, send_tokens):
    """-> (expert_x, expert_x_scale, expert_counts, group_sizes, recv_tokens, record_rows,
    record_weights, home_offsets)."""
    return _call("jem_dispatch_recv", _recv_results(op.config), op, send_tokens)


def dispatch(op: OpConfig, x, x_scale, topk_ids, topk_weights, num_tokens):
    """-> the results of dispatch_send, then those of dispatch_recv."""
    return _call("jem_dispatch", _send_results(op.config) + _recv_results(op.config), op,
                 x, x_scale, topk_ids, topk_weights, num_tokens)


def combine_send(op: OpConfig, expert_y, recv_tokens, record_rows, record_weights, home_offsets):
    """-> sent [R]."""
    return _call("jem_combine_send", _i32(op.config.num_ranks), op,
                 expert_y, recv_tokens, record_rows, record_weights, home_offsets)


def combine_recv(op: OpConfig, sent, send_tokens, send_index, num_tokens):
    """-> out [T, H]."""
    return _call("jem_combine_recv", _out(op.config), op,
                 sent, send_tokens, send_index, num_tokens)


def combine(op: OpConfig, expert_y, recv_tokens, record_rows, record_weights, home_offsets,
            send_tokens, send_index, num_tokens):
    """-> out [T, H]."""
    return _call("jem_combine", _out(op.config), op, expert_y, recv_tokens, record_rows,
                 record_weights, home_offsets, send_tokens, send_index, num_tokens)
