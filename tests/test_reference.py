"""The pure-JAX reference dispatch/combine against a NumPy oracle, in 2 processes.

Every run draws fresh routing (the seed is printed on failure). Dispatch: per-expert counts
exact, each local expert's rows (with their fp8 scales) equal to the oracle's as a multiset,
bit for bit, padding rows zero. Combine: the weighted sum of per-expert functions of the rows,
within fp32-accumulation tolerance.
"""

from __future__ import annotations

import os
import secrets
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, class, dispatch dtype, combine dtype, experts, k, hidden, tokens, alignment, routing,
#  use the send/recv halves)
CASES = [
    ("bf16", "ReferenceAllToAll", "bfloat16", "bfloat16", 8, 2, 256, 32, 1, "uniform", False),
    ("f32-align8", "ReferenceAllToAll", "float32", "float32", 16, 4, 128, 24, 8, "uniform", True),
    ("fp8-align8", "ReferenceAllToAll", "float8_e4m3fn", "bfloat16", 8, 3, 384, 20, 8, "zipf", False),
    ("fp8-f32-halves", "ReferenceAllToAll", "float8_e4m3fn", "float32", 8, 2, 256, 16, 1, "one_rank", True),
    ("padded-bf16-align8", "PaddedAllToAll", "bfloat16", "float32", 16, 4, 128, 24, 8, "uniform", False),
]


def _routing(rng, kind, ranks, tokens, experts, k):
    """topk_ids [R, T, k] with distinct experts per token and about 15% unused (-1) slots."""
    if kind == "uniform":
        p = np.full(experts, 1.0 / experts)
    elif kind == "zipf":
        p = 1.0 / np.arange(1, experts + 1) ** 1.2
        p = rng.permutation(p / p.sum())
    else:  # every token goes to the experts of one rank
        local = experts // ranks
        p = np.zeros(experts)
        target = rng.integers(ranks)
        p[target * local:(target + 1) * local] = 1.0 / local
    ids = np.stack([rng.choice(experts, size=k, replace=False, p=p)
                    for _ in range(ranks * tokens)]).astype(np.int32)
    ids[rng.random(ids.shape) < 0.15] = -1
    return ids.reshape(ranks, tokens, k)


def _row_bytes(x, scale, rows):
    return sorted(x[r].tobytes() + (b"" if scale is None else scale[r].tobytes()) for r in rows)


def _run_case(case, seed, mesh, axis):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import per_rank, reference

    (name, cls, ddt, cdt, E, k, H, T, align, kind, halves) = case
    R = mesh.shape[axis]
    L = E // R
    ddt, cdt = jnp.dtype(ddt), jnp.dtype(cdt)
    fp8 = ddt == jnp.dtype(jnp.float8_e4m3fn)
    rng = np.random.default_rng([seed, CASES.index(case)])

    # Global inputs, identical in every process; each rank feeds its own block.
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    x = (x * 8).astype(ddt) if fp8 else x.astype(ddt)
    scale = rng.uniform(0.5, 2.0, (R, T, H // 128)).astype(np.float32) if fp8 else None
    ids = _routing(rng, kind, R, T, E, k)
    weights = rng.uniform(0.1, 1.0, (R, T, k)).astype(np.float32)
    num_tokens = np.array([T if r == 0 else int(rng.integers(0, T)) for r in range(R)], np.int32)
    coef = rng.uniform(0.5, 1.5, E).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, E).astype(np.float32)

    comm = getattr(reference, cls)(mesh, axis, num_experts=E, experts_per_token=k, hidden=H,
                                   max_tokens_per_rank=T, dispatch_dtype=ddt, combine_dtype=cdt,
                                   expert_alignment=align)
    M = comm.max_recv_tokens

    def dequant(xs, sc):
        xs = xs.astype(jnp.float32)
        return xs * jnp.repeat(sc, 128, axis=1) if sc is not None else xs

    def step(x, sc, ids, w, n, coef, bias):
        if halves:
            d = comm.dispatch_recv(comm.dispatch_send(x, ids, w, x_scale=sc, num_tokens=n))
        else:
            d = comm.dispatch(x, ids, w, x_scale=sc, num_tokens=n)
        # Row p belongs to local expert l; y = f_l(row), a per-expert affine map.
        me = jax.lax.axis_index(axis)
        local = jnp.searchsorted(jnp.cumsum(d.group_sizes), jnp.arange(M), side="right")
        e = me * L + jnp.minimum(local, L - 1)
        y = (dequant(d.expert_x, d.expert_x_scale) * coef[e][:, None] + bias[e][:, None]).astype(cdt)
        out = (comm.combine_recv(comm.combine_send(y, d.handle)) if halves
               else comm.combine(y, d.handle))
        sc_out = d.expert_x_scale if fp8 else jnp.zeros((M, 1), jnp.float32)
        return d.expert_x, sc_out, d.expert_counts, d.group_sizes, out

    spec = P(axis)
    f = jax.jit(jax.shard_map(step, mesh=mesh,
                              in_specs=(spec, spec, spec, spec, spec, P(), P()),
                              out_specs=spec))
    put = lambda a: per_rank.put(mesh, axis, lambda r: a[r])
    args = (put(x), put(scale) if fp8 else None, put(ids), put(weights), put(num_tokens),
            jnp.asarray(coef), jnp.asarray(bias))
    expert_x, expert_scale, counts, groups, out = (per_rank.get(a, mesh, axis) for a in f(*args))

    for r in per_rank.local_ranks(mesh, axis):
        where = f"case {name}, rank {r}, seed {seed}"
        start = 0
        for l in range(L):
            e = r * L + l
            src = [(s, t) for s in range(R) for t in range(num_tokens[s]) if e in ids[s, t]]
            assert counts[r][l] == len(src), f"{where}: expert {e} count {counts[r][l]} != {len(src)}"
            g = -(-len(src) // align) * align
            assert groups[r][l] == g, f"{where}: expert {e} group size {groups[r][l]} != {g}"
            rows = range(start, start + len(src))
            want = sorted(x[s, t].tobytes() + (scale[s, t].tobytes() if fp8 else b"")
                          for s, t in src)
            got = _row_bytes(expert_x[r], expert_scale[r] if fp8 else None, rows)
            assert got == want, f"{where}: expert {e} rows differ from the oracle's"
            pad = expert_x[r][start + len(src):start + g].astype(np.float32)
            assert not pad.any(), f"{where}: expert {e} padding rows are not zero"
            start += g

        # Combine oracle: the same f_e on the same rows, rounded to the combine dtype, summed in f64.
        xr = x[r].astype(np.float32)
        if fp8:
            xr = xr * np.repeat(scale[r], 128, axis=1)
        want = np.zeros((T, H))
        for t in range(num_tokens[r]):
            for i, e in enumerate(ids[r, t]):
                if e >= 0:
                    y = (xr[t] * coef[e] + bias[e]).astype(cdt).astype(np.float64)
                    want[t] += weights[r, t, i] * y
        got = out[r].astype(np.float64)
        assert got.shape == (T, H)
        assert not got[num_tokens[r]:].any(), f"{where}: rows past num_tokens are not zero"
        # fp32 accumulation of k terms, then one rounding to the combine dtype.
        rtol = 1e-5 if cdt == jnp.dtype(jnp.float32) else 2 ** -7
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        assert err <= rtol, f"{where}: combine max rel error {err:.3g} > {rtol:.3g}"


def _lower_ragged(mesh, axis):
    """The ragged_all_to_all path traces and lowers (XLA:CPU cannot compile it)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe.reference import ReferenceAllToAll

    R, T, H, E, k = mesh.shape[axis], 8, 256, 8, 2
    comm = ReferenceAllToAll(mesh, axis, num_experts=E, experts_per_token=k, hidden=H,
                             max_tokens_per_rank=T, dispatch_dtype=jnp.float8_e4m3fn,
                             exchange="ragged", check=False)

    def step(x, sc, ids, w):
        d = comm.dispatch(x, ids, w, x_scale=sc)
        return comm.combine(d.expert_x.astype(jnp.bfloat16), d.handle), d.expert_x_scale

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
    text = f.lower(jax.ShapeDtypeStruct((R * T, H), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((R * T, H // 128), jnp.float32),
                   jax.ShapeDtypeStruct((R * T, k), jnp.int32),
                   jax.ShapeDtypeStruct((R * T, k), jnp.float32)).as_text()
    assert text.count("ragged_all_to_all") >= 3, "expected x, scale and combine exchanges"


def worker(rank, world, args):
    """Runs in each process (jax_efa_moe.launch): every case, then the ragged lowering."""
    from jax_efa_moe import per_rank

    seed = int(args[0])
    axis = "ep"
    mesh = per_rank.ep_mesh(axis)
    for case in CASES:
        _run_case(case, seed, mesh, axis)
    _lower_ragged(mesh, axis)
    print(f"rank {rank}: {len(CASES)} cases passed")


def test_reference_against_numpy_oracle():
    from jax_efa_moe import launch

    seed = secrets.randbits(32)
    path = os.pathsep.join([HERE, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    outputs = launch.run("test_reference:worker", num_processes=2, args=[str(seed)],
                         timeout_s=110, env={"PYTHONPATH": path})
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: {len(CASES)} cases passed" in out, f"seed {seed}:\n{out[-3000:]}"


if __name__ == "__main__":
    sys.exit(test_reference_against_numpy_oracle())


def test_bad_input_raises_clear_errors():
    import jax
    import jax.numpy as jnp
    import pytest
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import per_rank
    from jax_efa_moe.reference import ReferenceAllToAll

    mesh = per_rank.ep_mesh("ep")
    R = mesh.shape["ep"]
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        ReferenceAllToAll(mesh, "ep", num_experts=0, experts_per_token=2, hidden=128,
                          max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="multiple of 128"):
        ReferenceAllToAll(mesh, "ep", num_experts=4 * R, experts_per_token=2, hidden=100,
                          max_tokens_per_rank=4, dispatch_dtype=jnp.float8_e4m3fn)
    comm = ReferenceAllToAll(mesh, "ep", num_experts=4 * R, experts_per_token=2, hidden=128,
                             max_tokens_per_rank=4, max_recv_tokens=4)

    def run(x, ids, **kw):
        f = jax.shard_map(lambda x, i, w: comm.dispatch(x, i, w, **kw).expert_counts,
                          mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        return jax.jit(f)(x, ids, jnp.ones(ids.shape, jnp.float32)).block_until_ready()

    x = jnp.zeros((4 * R, 128), jnp.bfloat16)
    ids = jnp.zeros((4 * R, 2), jnp.int32)
    with pytest.raises(TypeError, match="x has dtype float32, expected bfloat16"):
        run(x.astype(jnp.float32), ids)
    with pytest.raises(TypeError, match="topk_ids has dtype int16, expected int32"):
        run(x, ids.astype(jnp.int16))
    with pytest.raises(ValueError, match="x_scale is only for float8 dispatch"):
        run(x, ids, x_scale=jnp.zeros((4, 1), jnp.float32))
    with pytest.raises(Exception, match="expert id outside"):
        run(x, ids.at[1, 0].set(4 * R))
    with pytest.raises(Exception, match="more than max_recv_tokens=4"):
        run(x, ids.at[:, 1].set(1))
