"""Gradients through AllToAll on the CPU backend, in 2 processes, one CPU device each.

The oracles are JAX's own autodiff of the stock path (ReferenceAllToAll) on the same inputs,
finite differences (jax.test_util.check_grads) for float32, and the gradients of the test's
experts written out in NumPy. Every rank draws every rank's inputs from one seed, fresh for
each run and printed (replay with JEM_TEST_SEED). Inputs enter replicated and each rank takes
its block, so gradients come back whole on every process; the NumPy check instead takes each
rank's gradients where they are, with no collective at all, so that it also runs on GPUs
shared by several processes (tests/test_gpu.py), where NCCL refuses a second rank.
"""

from __future__ import annotations


import numpy as np

import oracle
from oracle import SEED, make_routing, make_tokens

# (dispatch dtype, combine dtype, routings): skewed (zipf, one rank takes every token), -1
# slots, partial num_tokens, a token sent twice to one expert, nothing at all. float32 on both
# sides is checked against finite differences below.
CASES = (("bfloat16", "bfloat16", ("zipf", "one_rank", "unused_slots", "partial", "repeated",
                                   "empty")),
         ("float8_e4m3fn", "bfloat16", ("zipf", "unused_slots", "partial")),
         ("bfloat16", "float32", ("one_rank", "partial")))


def _rtol(dtype: str) -> float:
    """Allowed max |ours - reference| / max |reference| for values rounded to ``dtype``: both
    paths round the same sums, in a different order."""
    return 1e-5 if dtype == "float32" else 2 ** -6


_check = oracle.child_checker("test_autodiff", timeout_s=300.0)


def test_op_gradients_equal_the_reference():
    _check("check_op_gradients", "op gradients ok")


def test_moe_layer_gradients_equal_the_reference():
    _check("check_layer_gradients", "layer gradients ok")


def test_float32_gradients_match_finite_differences():
    _check("check_finite_differences", "finite differences ok")


def test_gradients_match_numpy():
    _check("check_gradients_against_numpy", "numpy gradients ok")


# --------------------------------------------------------------------------------------------
# The children: run by jax_efa_moe.launch in one process per rank.
# --------------------------------------------------------------------------------------------

def _replicated_scalar(mesh, per_rank_loss):
    """A jitted f(blocks, shared, constants) of whole (replicated) arrays, summed over ranks:
    each rank calls per_rank_loss(*blocks, *shared, *constants) with its own block of each
    [R, ...] array of ``blocks`` and ``constants`` (integers, and what is not differentiated)."""
    import jax
    from jax.sharding import PartitionSpec as P

    def f(blocks, shared, constants):
        r = jax.lax.axis_index("ep")
        mine = lambda arrays: [jax.lax.dynamic_index_in_dim(a, r, keepdims=False)
                               for a in arrays]
        return jax.lax.psum(per_rank_loss(*mine(blocks), *shared, *mine(constants)), "ep")

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P()))


def _expert_rows(comm, d, coef, bias):
    """The test's experts: tanh(x * coef[e]) + bias[e] per row of local expert e (padding rows
    too, so that their zero cotangent is checked), plus, for float8, the row's mean scale (so
    that the scales' cotangents go home too; dequantize_fp8 holds them constant)."""
    import jax
    import jax.numpy as jnp
    from jax_efa_moe import moe

    M, L = comm.max_recv_tokens, comm.num_experts // comm.num_ranks
    shift = 0.0
    if d.expert_x_scale is not None:
        x = moe.dequantize_fp8(d.expert_x, d.expert_x_scale, jnp.float32)
        shift = jnp.mean(d.expert_x_scale, axis=1, keepdims=True)
    else:
        x = d.expert_x.astype(jnp.float32)
    local = jnp.searchsorted(jnp.cumsum(d.group_sizes), jnp.arange(M), side="right")
    e = jax.lax.axis_index("ep") * L + jnp.minimum(local, L - 1)
    y = jnp.tanh(x * coef[e][:, None]) + bias[e][:, None] + shift
    return y.astype(comm.combine_dtype)


def _op_loss(comm, halves: bool):
    """Per rank: <combine(experts(dispatch(x))), ct>, through the fused ops or the halves with
    differentiable work between them."""
    import jax
    import jax.numpy as jnp

    def loss(x, scale, w, coef, bias, ct, ids, n):
        # float8 arrives as float32 holding float8 values: JAX's rules for the slicing above
        # expect float8 cotangents, a cast (as in moe.quantize_fp8) takes the wider one.
        x = x.astype(comm.dispatch_dtype)
        kw = dict(x_scale=scale if x.dtype == jnp.float8_e4m3fn else None, num_tokens=n)
        side = 0.0
        if halves:
            pending = comm.dispatch_send(x, ids, w, **kw)
            pending, side = jax.lax.optimization_barrier((pending, jnp.sum(jnp.sin(w))))
            d = comm.dispatch_recv(pending)
        else:
            d = comm.dispatch(x, ids, w, **kw)
        y = _expert_rows(comm, d, coef, bias)
        if halves:
            sent = comm.combine_send(y, d.handle)
            sent, side = jax.lax.optimization_barrier((sent, side))
            out = comm.combine_recv(sent)
        else:
            out = comm.combine(y, d.handle)
        return jnp.sum(out.astype(jnp.float32) * ct) + side

    return loss


def _close(a, b, rtol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, scale = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3g}, max |reference| {scale:.3g}"


def check_op_gradients(rank, world, args):
    import jax
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll, per_rank
    from jax_efa_moe.reference import ReferenceAllToAll

    mesh = per_rank.ep_mesh("ep")
    R, T, H, k, E = world, 16, 256, 3, 8
    rng = np.random.default_rng([SEED, 21])
    checked = 0
    for ddt, cdt, routings in CASES:
        kw = dict(num_experts=E, experts_per_token=k, hidden=H, max_tokens_per_rank=T,
                  dispatch_dtype=jnp.dtype(ddt), combine_dtype=jnp.dtype(cdt))
        ours = AllToAll(mesh, "ep", **kw)
        ref = ReferenceAllToAll(mesh, "ep", max_recv_tokens=ours.max_recv_tokens, **kw)
        grad = lambda comm, halves: jax.jit(jax.grad(
            _replicated_scalar(mesh, _op_loss(comm, halves)), argnums=(0, 1)))
        programs = {"fused": grad(ours, False), "halves": grad(ours, True),
                    "reference": grad(ref, False)}
        for kind in routings:
            ids, num_tokens = make_routing(kind, rng, R, T, E, k)
            x, scale = make_tokens(rng, R, T, H, ddt)
            if scale is not None:
                x = x.astype(np.float32)
            else:
                scale = np.zeros((R, T, 0), np.float32)
            w = rng.uniform(0.1, 1.0, (R, T, k)).astype(np.float32)
            ct = rng.standard_normal((R, T, H)).astype(np.float32)
            coef = rng.uniform(0.5, 1.5, E).astype(np.float32)
            bias = rng.uniform(-1.0, 1.0, E).astype(np.float32)
            inputs = (x, scale, w), (coef, bias), (ct, ids, num_tokens)
            got = {name: [np.asarray(a) for a in jax.tree.leaves(g(*inputs))]
                   for name, g in programs.items()}
            # The halves' loss adds sum(sin(w)), computed between the halves.
            got["halves"][2] = got["halves"][2] - np.cos(w)
            where = f"rank {rank}, {ddt}/{cdt}/{kind}"
            names = ("x", "x_scale", "topk_weights", "coef", "bias")
            for name, a, b, r in zip(names, got["fused"], got["reference"], got["halves"]):
                rtol = _rtol(ddt if name == "x" and ddt != "float8_e4m3fn" else cdt)
                _close(a, b, max(rtol, _rtol(cdt)), f"{where}: d{name}")
                _close(r, a, 1e-5, f"{where}: d{name} through the halves")
            dx, _, dw, _, _ = got["fused"]
            # Independently of the reference: no gradient where nothing was sent.
            live = np.arange(T)[None, :] < num_tokens[:, None]
            assert not dx[~live].astype(np.float32).any(), f"{where}: dx past num_tokens"
            assert not dw[~live[..., None] | (ids < 0)].any(), f"{where}: dw of unused slots"
            assert (kind == "empty") != bool(np.abs(dw).max()), f"{where}: dw all zero"
            checked += 1
        ours.close()
    print(f"rank {rank}: op gradients ok ({checked} cases)", flush=True)


def check_layer_gradients(rank, world, args):
    import jax
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll, moe, per_rank
    from jax_efa_moe.reference import ReferenceAllToAll

    mesh = per_rank.ep_mesh("ep")
    R, T = world, 16
    rng = np.random.default_rng([SEED, 22])
    for ddt in ("bfloat16", "float8_e4m3fn"):
        cfg = moe.MoEConfig(hidden=256, ffn=64, shared_ffn=64, num_experts=8,
                            experts_per_token=3, dispatch_dtype=jnp.dtype(ddt))
        L = cfg.num_experts // R
        params = moe.MoEParams(*(
            (rng.standard_normal(s) / s[-2] ** 0.5).astype(jnp.bfloat16) for s in
            ((256, 8), (8, 256, 64), (8, 256, 64), (8, 64, 256), (256, 64), (256, 64),
             (64, 256))))
        x = rng.standard_normal((R, T, cfg.hidden)).astype(jnp.bfloat16)
        num_tokens = np.array([T, T // 2 + 1], np.int32)[:R]
        ct = rng.standard_normal((R, T, cfg.hidden)).astype(np.float32)
        got = []
        for cls in (AllToAll, ReferenceAllToAll):
            comm = cls(mesh, "ep", max_tokens_per_rank=T, **cfg.comm_kwargs())

            def loss(x, p, ct, n, comm=comm):
                r = jax.lax.axis_index("ep")
                mine = lambda a: jax.lax.dynamic_slice_in_dim(a, r * L, L)
                p = p._replace(w_gate=mine(p.w_gate), w_up=mine(p.w_up),
                               w_down=mine(p.w_down))
                out = moe.moe_layer(p, x, comm, cfg, num_tokens=n)
                return jnp.sum(out.astype(jnp.float32) * ct)

            g = jax.jit(jax.grad(_replicated_scalar(mesh, loss), argnums=(0, 1)))
            got.append(jax.tree.map(np.asarray, g((x,), (params,), (ct, num_tokens))))
            comm.close()
        ((ours_dx,), (ours_p,)), ((ref_dx,), (ref_p,)) = got
        where = f"rank {rank}, moe_layer {ddt}"
        # bfloat16 activations and weights: ours and the stock path round the routed sum in
        # a different order, and that difference goes through every matmul of the backward.
        _close(ours_dx, ref_dx, 2 ** -4, f"{where}: dx")
        for name, a, b in zip(moe.MoEParams._fields, ours_p, ref_p):
            _close(a, b, 2 ** -4, f"{where}: d{name}")
        assert np.abs(ours_p.router.astype(np.float32)).max() > 0, f"{where}: no router grad"
    print(f"rank {rank}: layer gradients ok", flush=True)


def check_finite_differences(rank, world, args):
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads
    from jax_efa_moe import AllToAll, per_rank

    mesh = per_rank.ep_mesh("ep")
    R, T, H, k, E = world, 8, 16, 2, 4
    rng = np.random.default_rng([SEED, 23])
    comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                    max_tokens_per_rank=T, dispatch_dtype=jnp.float32,
                    combine_dtype=jnp.float32, expert_alignment=4)
    # -1 slots and partial num_tokens in one routing.
    ids, _ = make_routing("unused_slots", rng, R, T, E, k)
    _, num_tokens = make_routing("partial", rng, R, T, E, k)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    scale = np.zeros((R, T, 0), np.float32)
    ct = rng.standard_normal((R, T, H)).astype(np.float32)
    for halves in (False, True):
        f = _replicated_scalar(mesh, _op_loss(comm, halves))

        def loss(x, w, coef, bias, f=f):
            return f((x, scale, w), (coef, bias), (ct, ids, num_tokens))

        check_grads(loss, (x, rng.uniform(0.1, 1.0, (R, T, k)).astype(np.float32),
                           rng.uniform(0.5, 1.5, E).astype(np.float32),
                           rng.uniform(-1.0, 1.0, E).astype(np.float32)),
                    order=1, modes=["rev"], eps=1e-3)

    # An inference-only AllToAll computes the same forward and refuses a backward pass.
    inference = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                         max_tokens_per_rank=T, dispatch_dtype=jnp.float32,
                         combine_dtype=jnp.float32, expert_alignment=4, differentiable=False)
    args = (x, rng.uniform(0.1, 1.0, (R, T, k)).astype(np.float32),
            rng.uniform(0.5, 1.5, E).astype(np.float32),
            rng.uniform(-1.0, 1.0, E).astype(np.float32))

    def loss_of(c):
        f = _replicated_scalar(mesh, _op_loss(c, False))
        return lambda x, w, coef, bias: f((x, scale, w), (coef, bias), (ct, ids, num_tokens))

    assert np.array_equal(np.asarray(loss_of(inference)(*args)), np.asarray(loss_of(comm)(*args)))
    oracle.expect_error(lambda: jax.grad(loss_of(inference))(*args), "differentiable=False")
    inference.close()
    comm.close()
    print(f"rank {rank}: finite differences ok", flush=True)


def _per_rank_grads(mesh, per_rank_loss, num_diff: int):
    """jit(f)(*arrays), arrays [R, ...] (rank r's block is its own copy, whatever it is): the
    gradients of sum_r per_rank_loss(*blocks of r) with respect to the first ``num_diff``,
    per rank and sharded over "ep". A vjp with a cotangent of one per rank: no psum, no
    collective of XLA's."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    per_rank = jax.shard_map(lambda *blocks: per_rank_loss(*[b[0] for b in blocks])[None],
                             mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))

    def f(*arrays):
        rest = arrays[num_diff:]
        losses, vjp = jax.vjp(lambda *d: per_rank(*d, *rest), *arrays[:num_diff])
        return vjp(jnp.ones_like(losses))

    return jax.jit(f)


def _numpy_gradients(x, w, ids, n, coef, bias, ct, L):
    """The gradients of sum_s sum_t <ct[s,t], sum_i w[s,t,i] y(e_i, x[s,t])>, with the test's
    experts y(e, x) = tanh(x coef[e]) + bias[e] (_expert_rows), in float64: dx, dw per rank,
    and dcoef, dbias of each rank's copy (a copy only serves that rank's experts). Each comes
    with the same sum over absolute terms, the scale of any rounding of the terms."""
    R, T, k = ids.shape
    E = len(coef)
    x, w, ct = (a.astype(np.float64) for a in (x, w, ct))
    live = (np.arange(T)[None, :, None] < n[:, None, None]) & (ids >= 0) & (ids < E)
    e = np.where(live, ids, 0)
    z = x[:, :, None, :] * coef[e][..., None]  # [R, T, k, H]
    y = np.tanh(z) + bias[e][..., None]
    slope = (1 - np.tanh(z) ** 2) * live[..., None]
    pair = w[..., None] * ct[:, :, None, :]

    def per_copy(terms):  # [R, T, k] -> [R (the expert's rank), E]
        out = np.zeros((R, E))
        np.add.at(out, (e // L, e), terms)
        return out

    terms = {"x": pair * slope * coef[e][..., None],
             "w": ct[:, :, None, :] * y * live[..., None],
             "coef": pair * slope * x[:, :, None, :],
             "bias": pair * live[..., None]}
    sums = {"x": lambda t: t.sum(2), "w": lambda t: t.sum(-1),
            "coef": lambda t: per_copy(t.sum(-1)), "bias": lambda t: per_copy(t.sum(-1))}
    return {name: (sums[name](t), sums[name](np.abs(t))) for name, t in terms.items()}


def check_gradients_against_numpy(rank, world, args):
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll, per_rank

    mesh = per_rank.ep_mesh("ep")
    R, T, H, k, E = world, 16, 128, 3, 4 * world
    L = E // R
    rng = np.random.default_rng([SEED, 24])
    options = oracle.transport_options(args)
    checked = 0
    for ddt, cdt in (("float32", "float32"), ("bfloat16", "bfloat16")):
        comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                        max_tokens_per_rank=T, dispatch_dtype=jnp.dtype(ddt),
                        combine_dtype=jnp.dtype(cdt), expert_alignment=4, **options)
        for halves in (False, True):
            loss = _op_loss(comm, halves)
            grads = _per_rank_grads(
                mesh, lambda x, w, coef, bias, scale, ct, ids, n: loss(
                    x, scale, w, coef, bias, ct, ids, n), 4)
            for kind in ("uniform", "zipf", "unused_slots", "partial"):
                ids, num_tokens = make_routing(kind, rng, R, T, E, k)
                x, _ = make_tokens(rng, R, T, H, ddt)
                x = x.astype(np.float32)
                w = rng.uniform(0.1, 1.0, (R, T, k)).astype(np.float32)
                coef = rng.uniform(0.5, 1.5, E).astype(np.float32)
                bias = rng.uniform(-1.0, 1.0, E).astype(np.float32)
                ct = rng.standard_normal((R, T, H)).astype(np.float32)
                copies = lambda a: np.broadcast_to(a, (R,) + a.shape).copy()  # noqa: E731
                got = [per_rank.get(g, mesh, "ep") for g in grads(
                    x, w, copies(coef), copies(bias), np.zeros((R, T, 0), np.float32), ct,
                    ids, num_tokens)]
                comm.raise_if_failed()
                want = _numpy_gradients(x, w, ids, num_tokens, coef.astype(np.float64),
                                        bias.astype(np.float64), ct, L)
                # Of the sum of each gradient's absolute terms: in 16 bits a gradient passes up
                # to four roundings (2^-8 each) on its way; the floor takes XLA's float32 tanh,
                # whose absolute error 1 - tanh^2 turns into a relative one near saturation.
                rtol = 1e-5 if cdt == "float32" else 2.0 ** -5
                for r in got[0]:
                    where = f"rank {r}, {ddt}/{cdt}/{kind}{' halves' if halves else ''}"
                    dw = got[1][r] - (np.cos(w[r]) if halves else 0.0)
                    for name, a in zip(("x", "w", "coef", "bias"),
                                       (got[0][r], dw, got[2][r], got[3][r])):
                        value, scale = (v[r] for v in want[name])
                        err = np.abs(a.reshape(value.shape).astype(np.float64) - value)
                        bound = rtol * (scale + scale.max() / 16) + 1e-6
                        worst = np.unravel_index(np.argmax(err - bound), err.shape)
                        assert (err <= bound).all(), (
                            f"{where}: d{name}{list(worst)} is {a.reshape(value.shape)[worst]}, "
                            f"NumPy {value[worst]} (terms summing to {scale[worst]} in size)")
                checked += 1
        comm.close()
    print(f"rank {rank}: numpy gradients ok ({checked} cases)", flush=True)
