"""An expert-parallel MoE layer to copy: router, dispatch, SwiGLU experts, combine, shared expert.

It runs per rank inside ``jax.shard_map`` over the EP axis and takes any ``comm`` with the
dispatch/combine interface (:class:`jax_efa_moe.AllToAll`, or the stock
:class:`jax_efa_moe.reference.ReferenceAllToAll`)::

    cfg = MoEConfig(hidden=512, ffn=256, shared_ffn=256, num_experts=32, experts_per_token=8)
    comm = AllToAll(mesh, "ep", max_tokens_per_rank=T, **cfg.comm_kwargs())
    params = init_params(jax.random.key(0), cfg, mesh, "ep")
    layer = jax.jit(jax.shard_map(lambda p, x: moe_layer(p, x, comm, cfg), mesh=mesh,
                                  in_specs=(param_specs("ep"), P("ep")), out_specs=P("ep")))

The shared expert runs between ``dispatch_send`` and ``dispatch_recv``, so its matmuls overlap
the token transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_efa_moe.config import SCALE_BLOCK, check_int, check_model

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)


@dataclass(frozen=True)
class MoEConfig:
    """A layer's shapes; the fields it shares with the all-to-all are checked as AllToAll
    checks them (jax_efa_moe.config), so a bad one fails here, before any set-up."""

    hidden: int
    ffn: int                     # intermediate width of each routed expert
    shared_ffn: int              # intermediate width of the shared expert (0: none)
    num_experts: int
    experts_per_token: int
    dispatch_dtype: jnp.dtype = jnp.bfloat16   # bfloat16, or float8_e4m3fn (quantized here)
    combine_dtype: jnp.dtype = jnp.bfloat16
    dtype: jnp.dtype = jnp.bfloat16            # activations and weights

    def __post_init__(self):
        check_model(self.num_experts, self.experts_per_token, self.hidden, self.dispatch_dtype,
                    self.combine_dtype)
        check_int("ffn", self.ffn)
        check_int("shared_ffn", self.shared_ffn, low=0)

    def comm_kwargs(self) -> dict:
        """The sizes and dtypes a dispatch/combine object is built with."""
        return dict(num_experts=self.num_experts, experts_per_token=self.experts_per_token,
                    hidden=self.hidden, dispatch_dtype=self.dispatch_dtype,
                    combine_dtype=self.combine_dtype)


class MoEParams(NamedTuple):
    router: jax.Array        # [H, E], replicated
    w_gate: jax.Array        # [E, H, F], experts split over the EP axis
    w_up: jax.Array          # [E, H, F]
    w_down: jax.Array        # [E, F, H]
    shared_gate: jax.Array   # [H, Fs], replicated
    shared_up: jax.Array     # [H, Fs]
    shared_down: jax.Array   # [Fs, H]


def param_specs(axis_name: str, leading: tuple = ()) -> MoEParams:
    """shard_map specs of MoEParams; ``leading`` prefixes unsplit axes (e.g. a layer axis)."""
    rep = P(*leading)
    ep = P(*leading, axis_name)
    return MoEParams(rep, ep, ep, ep, rep, rep, rep)


def init_params(key, cfg: MoEConfig, mesh, axis_name: str, num_layers: int | None = None):
    """Random weights, each rank generating only its own experts; stacked when num_layers."""
    H, F, Fs, E = cfg.hidden, cfg.ffn, cfg.shared_ffn, cfg.num_experts
    lead = () if num_layers is None else (num_layers,)
    shapes = MoEParams((H, E), (E, H, F), (E, H, F), (E, F, H), (H, Fs), (H, Fs), (Fs, H))
    fan_in = MoEParams(H, H, H, F, H, H, Fs)

    def init(key):
        keys = jax.random.split(key, len(shapes))
        return MoEParams(*(
            (jax.random.normal(k, lead + s, jnp.float32) / max(f, 1) ** 0.5).astype(cfg.dtype)
            for k, s, f in zip(keys, shapes, fan_in)))

    specs = param_specs(axis_name, (None,) * len(lead))
    out = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                       is_leaf=lambda s: isinstance(s, P))
    return jax.jit(init, out_shardings=out)(key)


def route(x, router, k):
    """Top-k experts per token from the router logits, weights softmax-normalized over the k."""
    logits = jnp.dot(x, router, preferred_element_type=jnp.float32)
    top_logits, top_ids = jax.lax.top_k(logits, k)
    return top_ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)


def quantize_fp8(x):
    """float8_e4m3fn values with one float32 scale per 128 channels (x ≈ q * scale).

    Gradients are straight-through: the rounding counts as the identity and the scale as a
    constant, so q's cotangent reaches x divided by the scale, and with dequantize_fp8 the pair
    passes cotangents unchanged."""
    T, H = x.shape
    blocks = x.astype(jnp.float32).reshape(T, H // SCALE_BLOCK, SCALE_BLOCK)
    scale = jax.lax.stop_gradient(jnp.maximum(jnp.abs(blocks).max(-1) / FP8_MAX, 1e-12))
    q = (blocks / scale[..., None]).astype(FP8).reshape(T, H)
    return q, scale


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def dequantize_fp8(q, scale, dtype):
    """q * scale in ``dtype``; with quantize_fp8, straight-through for gradients: the scale is
    held constant (no gradient), and q's cotangent is ``dtype``, not float8 as JAX's own rule
    would make it (3 mantissa bits, and every value below 2**-9 flushed to zero). JAX accepts a
    wider float cotangent for a float8 input, and dispatch's backward carries it home."""
    return (q.astype(jnp.float32) * jnp.repeat(scale, SCALE_BLOCK, axis=1)).astype(dtype)


def _dequantize_fwd(q, scale, dtype):
    return dequantize_fp8(q, scale, dtype), scale


def _dequantize_bwd(dtype, scale, ct):
    T, H = ct.shape
    blocks = ct.astype(jnp.float32).reshape(T, H // SCALE_BLOCK, SCALE_BLOCK)
    return (blocks * scale[..., None]).reshape(T, H).astype(dtype), None


dequantize_fp8.defvjp(_dequantize_fwd, _dequantize_bwd)


def swiglu(x, w_gate, w_up, w_down):
    """A dense SwiGLU MLP (the shared expert)."""
    g = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    return jnp.dot(h, w_down, preferred_element_type=jnp.float32)


def experts(x, group_sizes, w_gate, w_up, w_down):
    """SwiGLU of every local expert over its rows of ``x`` (grouped GEMMs via ragged_dot)."""
    g = jax.lax.ragged_dot(x, w_gate, group_sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(x, w_up, group_sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    return jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)


def moe_layer(params: MoEParams, x, comm, cfg: MoEConfig, *, num_tokens=None):
    """One MoE block per rank: x [T, H] -> [T, H] in x's dtype."""
    topk_ids, topk_weights = route(x, params.router, cfg.experts_per_token)
    if jnp.dtype(cfg.dispatch_dtype) == FP8:
        xq, x_scale = quantize_fp8(x)
    else:
        xq, x_scale = x.astype(cfg.dispatch_dtype), None
    pending = comm.dispatch_send(xq, topk_ids, topk_weights, x_scale=x_scale,
                                 num_tokens=num_tokens)
    # The barriers pin the shared expert between the two halves, where it hides the transfer.
    pending, x = jax.lax.optimization_barrier((pending, x))
    shared = (swiglu(x, params.shared_gate, params.shared_up, params.shared_down)
              if cfg.shared_ffn else jnp.zeros(x.shape, jnp.float32))
    pending, shared = jax.lax.optimization_barrier((pending, shared))
    d = comm.dispatch_recv(pending)

    ex = (dequantize_fp8(d.expert_x, d.expert_x_scale, cfg.dtype) if d.expert_x_scale is not None
          else d.expert_x.astype(cfg.dtype))
    y = experts(ex, d.group_sizes, params.w_gate, params.w_up, params.w_down)
    routed = comm.combine(y.astype(cfg.combine_dtype), d.handle)
    return (routed.astype(jnp.float32) + shared).astype(x.dtype)


def rms_norm(x, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def moe_block(params: MoEParams, x, comm, cfg: MoEConfig, *, num_tokens=None):
    """A pre-norm residual MoE block: x + moe_layer(rms_norm(x))."""
    return x + moe_layer(params, rms_norm(x), comm, cfg, num_tokens=num_tokens)
