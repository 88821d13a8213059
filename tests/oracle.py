"""The tests' one oracle: routings, inputs, the test's experts, dispatch and combine checks
and expected errors, written in NumPy independently of the code under test.

The CPU (test_all_to_all), GPU (test_gpu) and reference (test_reference) suites all draw
their inputs here and hold their results to the same checks. Inputs are global, [R, ...] with
one block per rank, drawn from a generator each test seeds (fresh every run, printed).
"""

from __future__ import annotations

import os
import secrets

import numpy as np

# Fresh inputs every run; printed by the tests, so a failure can be replayed with
# JEM_TEST_SEED (child processes inherit it).
SEED = int(os.environ.get("JEM_TEST_SEED") or secrets.randbits(32))

ROUTINGS = ("uniform", "zipf", "one_expert", "same_experts", "one_rank", "unused_slots",
            "repeated", "partial", "empty")
# Routings that fit max_recv_tokens = 1.5 T only through the overflow region.
OVERFLOW_ROUTINGS = ("overflow_peers", "overflow_self")


def make_routing(kind: str, rng, R: int, T: int, E: int, k: int):
    """(topk_ids [R, T, k], num_tokens [R]); rows past num_tokens hold garbage ids."""
    L = E // R
    uniform = np.argsort(rng.random((R, T, E)), axis=-1)[..., :k]
    num_tokens = np.full(R, T)
    if kind in ("uniform", "partial", "empty"):
        ids = uniform
        if kind == "partial":
            num_tokens = rng.integers(0, T + 1, R)
            num_tokens[0], num_tokens[-1] = 0, T // 3
        if kind == "empty":
            num_tokens[:] = 0
    elif kind == "zipf":
        logits = np.log(1.0 / np.arange(1, E + 1) ** 1.2)[rng.permutation(E)]
        ids = np.argsort(-(logits + rng.gumbel(size=(R, T, E))), axis=-1)[..., :k]
    elif kind == "one_expert":
        ids = np.full((R, T, k), -1)
        ids[..., 0] = rng.integers(E)
    elif kind == "same_experts":
        ids = np.broadcast_to(rng.choice(E, k, replace=False), (R, T, k))
    elif kind == "one_rank":
        ids = rng.integers(R) * L + np.argsort(rng.random((R, T, L)), axis=-1)[..., :k]
    elif kind == "unused_slots":
        ids = np.where(rng.random((R, T, k)) < 0.4, -1, uniform)
        ids[:, :3] = -1
    elif kind == "repeated":
        ids = uniform.copy()
        ids[:, ::2, 1] = ids[:, ::2, 0]
    elif kind in OVERFLOW_ROUTINGS:
        # One slot per token, every token to the last rank: 1.25 T rows there. Its private
        # slots hold ceil(1.5 T / R) records per sender, so the big senders overflow.
        ids = np.full((R, T, k), -1)
        ids[..., 0] = (R - 1) * L + rng.integers(0, L, (R, T))
        num_tokens = np.zeros(R, np.int64)
        if kind == "overflow_self":
            num_tokens[0], num_tokens[R - 1] = T // 4, T
        elif R == 2:
            num_tokens[:] = T, T // 4
        else:
            num_tokens[0] = num_tokens[1] = T // 2
            num_tokens[R - 1] = T // 4
    else:
        raise ValueError(kind)
    ids = np.array(ids, np.int32)
    for r in range(R):
        ids[r, num_tokens[r]:] = rng.choice([-5, E, E + 7, -1], size=(T - num_tokens[r], k))
    return ids, num_tokens.astype(np.int32)


def make_tokens(rng, R, T, H, dtype):
    import ml_dtypes

    values = rng.standard_normal((R, T, H)).astype(np.float32)
    if dtype == "float8_e4m3fn":
        x = (values * 8).astype(ml_dtypes.float8_e4m3fn)
        scale = rng.uniform(0.5, 2.0, (R, T, H // 128)).astype(np.float32)
        return x, scale
    return values.astype(np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)), None


def make_inputs(kind: str, rng, R: int, T: int, E: int, k: int, H: int, dtype: str):
    """-> (topk_ids, num_tokens, topk_weights, x, x_scale or None): one routing and its tokens."""
    ids, num_tokens = make_routing(kind, rng, R, T, E, k)
    weights = rng.random((R, T, k)).astype(np.float32)
    x, scale = make_tokens(rng, R, T, H, dtype)
    return ids, num_tokens, weights, x, scale


def expert_output(x_rows, scale_rows, expert_ids, E, combine_dtype):
    """What the test's experts compute: (dequantized x) * (1 + e / E) + e / E, per row."""
    x = x_rows.astype(np.float32)
    if scale_rows is not None:
        x = x * np.repeat(scale_rows, 128, axis=-1)
    e = expert_ids.astype(np.float32)[:, None]
    return (x * (1 + e / E) + e / E).astype(combine_dtype)


def row_bytes(x_rows, scale_rows):
    def as_bytes(a):
        return np.ascontiguousarray(a).view(np.uint8).reshape(len(a), a[0:1].nbytes or
                                                               a.itemsize * a.shape[1])
    rows = as_bytes(x_rows)
    if scale_rows is not None:
        rows = np.concatenate([rows, as_bytes(scale_rows)], 1)
    return rows


def sorted_rows(rows):
    return rows[np.lexsort(rows.T[::-1])] if len(rows) else rows


def check_dispatch(rank, R, E, align, ids, num_tokens, x, scale, got):
    """Counts equal, each local expert's rows equal the oracle's as a multiset (bit for bit),
    padding and unused rows zero."""
    expert_x, expert_x_scale, counts, groups = got
    L = E // R
    start = 0
    for e in range(L):
        live = np.arange(ids.shape[1])[None, :, None] < num_tokens[:, None, None]
        s, t, _ = np.nonzero((ids == rank * L + e) & live)
        assert counts[e] == len(s), (e, counts, len(s))
        assert groups[e] == -(-len(s) // align) * align, (e, groups)
        end = start + counts[e]
        want_rows = row_bytes(x[s, t], None if scale is None else scale[s, t])
        got_rows = row_bytes(expert_x[start:end],
                             None if scale is None else expert_x_scale[start:end])
        np.testing.assert_array_equal(sorted_rows(got_rows), sorted_rows(want_rows))
        assert not row_bytes(expert_x[end:start + groups[e]], None).any(), "padding not zero"
        start += groups[e]
    assert not row_bytes(expert_x[start:], None).any(), "rows past the groups not zero"


def check_combine(rank, E, combine_dtype, ids, weights, num_tokens, x, scale, out):
    T, k = ids.shape[1:]
    n = num_tokens[rank]
    want = np.zeros(out.shape, np.float64)
    bound = np.zeros(out.shape, np.float64)
    for i in range(k):
        e = ids[rank, :n, i]
        used = e >= 0
        y = expert_output(x[rank, :n], None if scale is None else scale[rank, :n],
                          np.where(used, e, 0), E, combine_dtype).astype(np.float64)
        term = np.where(used[:, None], weights[rank, :n, i, None] * y, 0.0)
        want[:n] += term
        bound[:n] += np.abs(term)
    # 16-bit: each expert output may round one ulp apart from NumPy's (XLA fuses x * a + b;
    # 2^-7 relative at most), then the sum rounds once more (2^-8): a wrong row is off by O(1).
    rel = 2.0 ** -7 + 2.0 ** -8 if combine_dtype.itemsize == 2 else 1e-5
    err = np.abs(out.astype(np.float64) - want)
    assert (err <= rel * bound + 1e-6).all(), (
        f"combine differs by up to {err.max()} (bound {(rel * bound).max()})")
    assert not out[n:].astype(np.float32).any(), "rows past num_tokens not zero"


# --- the same experts inside shard_map, and the programs that run them ---


def experts(comm, d):
    """The test's experts, applied to the per-expert layout (see expert_output)."""
    import jax
    import jax.numpy as jnp

    x = d.expert_x.astype(jnp.float32)
    if d.expert_x_scale is not None:
        x = x * jnp.repeat(d.expert_x_scale, 128, axis=1)
    # compare_all: one fusion, where the default method is a loop, which would split a step's
    # command buffer on GPUs.
    local = jnp.searchsorted(jnp.cumsum(d.group_sizes), jnp.arange(comm.max_recv_tokens),
                             side="right", method="compare_all")
    first = jax.lax.axis_index(comm.axis_name) * comm.local_experts
    e = (first + local).astype(jnp.float32)[:, None]
    E = comm.num_experts
    return (x * (1 + e / E) + e / E).astype(comm.combine_dtype)


def programs(comm, mesh):
    """Jitted per-rank programs: whole calls, halves with work between them, and 100 steps
    in one fori_loop."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    def whole(x, ids, w, scale, n):
        d = comm.dispatch(x, ids, w, x_scale=scale if comm.has_scales else None,
                          num_tokens=n[0])
        out = comm.combine(experts(comm, d), d.handle)
        return d.expert_x, d.expert_x_scale, d.expert_counts, d.group_sizes, out

    def halves(x, ids, w, scale, n):
        pending = comm.dispatch_send(x, ids, w, x_scale=scale if comm.has_scales else None,
                                     num_tokens=n[0])
        shared = jnp.tanh(x.astype(jnp.float32) @ x.astype(jnp.float32).T)
        d = comm.dispatch_recv(pending)
        sent = comm.combine_send(experts(comm, d), d.handle)
        shared = shared.sum() * 2
        out = comm.combine_recv(sent)
        return d.expert_x, d.expert_x_scale, d.expert_counts, d.group_sizes, out, shared[None]

    def loop(x, ids, w, scale, n):
        first = whole(x, ids, w, scale, n)

        def step(_, mismatches):
            again = whole(x, ids, w, scale, n)
            return mismatches + sum(jnp.sum(a != b) for a, b in zip(again, first)
                                    if a is not None)

        none_yet = jnp.sum(first[2]) * 0  # varying over the axis, like the step's count
        return jax.lax.fori_loop(0, 99, step, none_yet)[None]

    def program(f):
        spec = P(comm.axis_name)
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))

    return program(whole), program(halves), program(loop)


def run_checked(comm, mesh, program, kind: str, rng) -> None:
    """Runs ``program`` (``whole`` or ``halves`` of :func:`programs`) on fresh inputs routed
    by ``kind`` and checks every rank this process holds, in either process model."""
    from jax_efa_moe import per_rank

    R, T, E = comm.num_ranks, comm.max_tokens_per_rank, comm.num_experts
    ids, num_tokens, weights, x, scale = make_inputs(
        kind, rng, R, T, E, comm.experts_per_token, comm.hidden, comm.dispatch_dtype.name)
    scales = scale if scale is not None else np.zeros((R, T, 0), np.float32)
    inputs = [per_rank.put(mesh, comm.axis_name, lambda r, a=a: a[r])
              for a in (x, ids, weights, scales, num_tokens[:, None])]
    got = [None if a is None else per_rank.get(a, mesh, comm.axis_name)
           for a in program(*inputs)]
    for r in per_rank.local_ranks(mesh, comm.axis_name):
        mine = [None if a is None else a[r] for a in got]
        try:
            check_dispatch(r, R, E, comm.expert_alignment, ids, num_tokens, x, scale, mine[:4])
            check_combine(r, E, np.dtype(comm.combine_dtype), ids, weights, num_tokens, x,
                          scale, mine[4])
        except AssertionError as e:
            raise AssertionError(f"rank {r}, routing {kind}, seed {SEED}: {e}") from e


def expect_error(fn, *texts):
    """Runs fn; -> its error message, which must contain one of ``texts``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - JAX wraps FFI errors in its runtime error type
        message = str(e)
        assert any(t in message for t in texts), f"unexpected error: {message}"
        return message
    raise AssertionError(f"no error, expected one of {texts}")


def transport_options(args) -> dict:
    """AllToAll options from "name=value" arguments of a child: ranks_per_node, transport,
    num_nics, fabric_staging (the GPU path's node split, NICs and fabric buffer), max_sms."""
    options = {}
    for arg in args:
        name, value = arg.split("=", 1)
        if name in ("ranks_per_node", "num_nics", "max_sms"):
            options[name] = int(value)
        elif name == "fabric_staging":
            options[name] = {"none": None, "host": True, "device": False}[value]
        else:
            options[name] = value
    return options


def run_children(target: str, num_processes: int, *args: str, timeout_s: float = 240.0,
                 env: dict[str, str] | None = None, platform: str = "cpu") -> list[str]:
    """``target`` ("test_module:function") in one process per rank, with this folder on the
    path and this run's seed (printed, so that a failure can be replayed)."""
    from jax_efa_moe import launch

    path = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                            os.environ.get("PYTHONPATH", "")])
    print(f"JEM_TEST_SEED={SEED}")
    return launch.run(target, num_processes, list(args), timeout_s=timeout_s, platform=platform,
                      env={"PYTHONPATH": path, "JEM_TEST_SEED": str(SEED), **(env or {})})


def check_children(target: str, num_processes: int, says: str, *args: str, **kwargs) -> None:
    """run_children, and every rank must have printed ``says``, which a child prints once its
    checks pass."""
    outputs = run_children(target, num_processes, *args, **kwargs)
    assert all(says in out for out in outputs), outputs


def child_checker(module: str, timeout_s: float):
    """check(function, says): check_children of ``module``'s ``function`` in 2 processes."""
    return lambda function, says: check_children(f"{module}:{function}", 2, says,
                                                 timeout_s=timeout_s)
