"""The pure-JAX reference dispatch/combine against the NumPy oracle, in 2 processes.

Every run draws fresh routing (the seed is printed; JEM_TEST_SEED replays it). The inputs,
the experts and the checks are the ones the AllToAll suites use (oracle.py): per-expert counts
exact, each local expert's rows (with their fp8 scales) equal to the oracle's as a multiset,
bit for bit, padding and unused rows zero; combine the weighted sum of the experts' outputs
within fp32-accumulation tolerance.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import oracle

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, class, dispatch dtype, combine dtype, experts, k, hidden, tokens, alignment, routing,
#  use the send/recv halves)
CASES = [
    ("bf16", "ReferenceAllToAll", "bfloat16", "bfloat16", 8, 2, 256, 32, 1, "unused_slots",
     False),
    ("f32-align8", "ReferenceAllToAll", "float32", "float32", 16, 4, 128, 24, 8, "partial",
     True),
    ("fp8-align8", "ReferenceAllToAll", "float8_e4m3fn", "bfloat16", 8, 3, 384, 20, 8, "zipf",
     False),
    ("fp8-f32-halves", "ReferenceAllToAll", "float8_e4m3fn", "float32", 8, 2, 256, 16, 1,
     "one_rank", True),
    ("padded-bf16-align8", "PaddedAllToAll", "bfloat16", "float32", 16, 4, 128, 24, 8,
     "repeated", False),
]


def _run_case(case, mesh, axis):
    import jax.numpy as jnp
    from jax_efa_moe import reference

    (name, cls, ddt, cdt, E, k, H, T, align, kind, halves) = case
    comm = getattr(reference, cls)(mesh, axis, num_experts=E, experts_per_token=k, hidden=H,
                                   max_tokens_per_rank=T, dispatch_dtype=jnp.dtype(ddt),
                                   combine_dtype=jnp.dtype(cdt), expert_alignment=align)
    whole, split, _ = oracle.programs(comm, mesh)
    rng = np.random.default_rng([oracle.SEED, CASES.index(case)])
    try:
        oracle.run_checked(comm, mesh, split if halves else whole, kind, rng)
    except AssertionError as e:
        raise AssertionError(f"case {name}: {e}") from e


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

    axis = "ep"
    mesh = per_rank.ep_mesh(axis)
    for case in CASES:
        _run_case(case, mesh, axis)
    _lower_ragged(mesh, axis)
    print(f"rank {rank}: {len(CASES)} cases passed")


def test_reference_against_numpy_oracle():
    from jax_efa_moe import launch

    print(f"JEM_TEST_SEED={oracle.SEED}")
    path = os.pathsep.join([HERE, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    outputs = launch.run("test_reference:worker", num_processes=2, timeout_s=110,
                         env={"PYTHONPATH": path, "JEM_TEST_SEED": str(oracle.SEED)})
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: {len(CASES)} cases passed" in out, out[-3000:]


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


def test_float8_rows_that_do_not_vary_have_a_gradient():
    """The reference moves float8 rows as bytes under a custom VJP; the cotangent it returns
    must vary over the same mesh axes as those rows. ragged_all_to_all's output buffer varies
    over none, and jax.grad of the stock path failed there on the GPU."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import reference

    rng = np.random.default_rng(oracle.SEED)
    n, h = 16, 8
    w = rng.choice([-2.0, -1.0, 0.5, 1.0, 2.0], size=(n, h)).astype(np.float32)
    c = rng.choice([-2.0, -1.0, 1.0, 2.0], size=(n, h)).astype(np.float32)
    order = rng.permutation(n).astype(np.int32)
    mesh = jax.make_mesh((1,), ("ep",))

    def loss(w):
        rows = w.astype(jnp.float8_e4m3fn)  # varies over no axis: w is replicated
        moved = reference._bytewise(lambda a, i: jnp.take(a, i, axis=0), rows, order)
        return jnp.sum(moved.astype(jnp.float32) * c)

    grad = jax.grad(jax.shard_map(loss, mesh=mesh, in_specs=P(), out_specs=P()))(w)
    expected = np.zeros_like(c)
    expected[order] = c
    np.testing.assert_array_equal(np.asarray(grad), expected)
