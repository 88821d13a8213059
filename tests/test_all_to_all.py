"""AllToAll end to end on the CPU backend: 2 and 4 processes, one CPU device each.

Every rank draws every rank's inputs from one seed, drawn fresh for each run (printed, so a
failure can be replayed with JEM_TEST_SEED), so each can check its own results against a NumPy
oracle written here, independently of the C++ code. Many cases share one launch
(each launch costs a JAX start-up per process).
"""

from __future__ import annotations

import os
import secrets
import sys
import time

import numpy as np
import pytest

from jax_efa_moe import bootstrap, launch, providers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SEED = int(os.environ.get("JEM_TEST_SEED") or secrets.randbits(32))
ROUTINGS = ("uniform", "zipf", "one_expert", "same_experts", "one_rank", "unused_slots",
            "repeated", "partial", "empty")
# Routings that fit max_recv_tokens = 1.5 T only through the overflow region.
OVERFLOW_ROUTINGS = ("overflow_peers", "overflow_self")


def _run(function: str, num_processes: int, *args: str, timeout_s: float = 240.0,
         env: dict[str, str] | None = None) -> list[str]:
    path = os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])
    print(f"JEM_TEST_SEED={SEED}")
    return launch.run(f"test_all_to_all:{function}", num_processes, list(args),
                      timeout_s=timeout_s,
                      env={"PYTHONPATH": path, "JEM_TEST_SEED": str(SEED), **(env or {})})


# --------------------------------------------------------------------------------------------
# The parent side: what pytest runs.
# --------------------------------------------------------------------------------------------

def test_two_ranks_every_routing_dtype_and_alignment():
    outputs = _run("check_cases", 2, "auto")
    assert all("checked" in out for out in outputs), outputs


def test_four_ranks_every_routing_over_tcp():
    outputs = _run("check_cases", 4, "tcp;ofi_rxm")
    assert all("checked" in out for out in outputs), outputs


def test_two_ranks_with_writes_delivered_out_of_order():
    # The engines' reorder test mode: arrivals and completions released as EFA may.
    outputs = _run("check_cases", 2, "auto", env={"JEM_REORDER_SEED": str(SEED or 1)})
    assert all("checked" in out for out in outputs), outputs


def test_bad_input_is_reported_on_every_rank():
    outputs = _run("check_bad_input", 2)
    assert all("bad input ok" in out for out in outputs), outputs


def test_dead_peer_is_an_error_within_the_timeout():
    outputs = _run("check_dead_peer", 2)
    assert "dead peer reported" in outputs[0], outputs


def test_one_rank_in_this_process():
    # One rank: every token stays home, through the same protocol (no peers to wait for).
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices("cpu")[:1])
    T, H, k, E = 8, 128, 2, 4
    rng = np.random.default_rng([SEED, 11])
    ids, num_tokens = make_routing("unused_slots", rng, 1, T, E, k)
    weights = rng.random((1, T, k)).astype(np.float32)
    x, _ = make_tokens(rng, 1, T, H, "float32")
    with AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                  max_tokens_per_rank=T, dispatch_dtype=jnp.float32,
                  combine_dtype=jnp.float32, expert_alignment=4) as comm:
        def f(x, ids, w):
            d = comm.dispatch(x, ids, w)
            return (d.expert_x, d.expert_counts, d.group_sizes,
                    comm.combine(_experts(comm, d), d.handle))

        program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        got = [np.asarray(a) for a in program(*[_sharded(mesh, a[0]) for a in (x, ids, weights)])]
    check_dispatch(0, 1, E, 4, ids, num_tokens, x, None, (got[0], None, got[1], got[2]))
    check_combine(0, E, np.dtype(np.float32), ids, weights, num_tokens, x, None, got[3])


def test_provider_choice():
    one_host = [{"host": "a", "providers": ["tcp;ofi_rxm", "shm"]}] * 2
    assert providers.choose(one_host) == "shm"
    two_hosts = [{"host": "a", "providers": ["tcp;ofi_rxm", "shm"]},
                 {"host": "b", "providers": ["tcp;ofi_rxm", "shm"]}]
    assert providers.choose(two_hosts) == "tcp;ofi_rxm"
    efa = [{"host": h, "providers": ["efa", "verbs;ofi_rxm", "tcp;ofi_rxm"]} for h in "ab"]
    assert providers.choose(efa) == "efa"
    partial_efa = [efa[0], {"host": "b", "providers": ["verbs;ofi_rxm", "tcp;ofi_rxm"]}]
    assert providers.choose(partial_efa) == "verbs;ofi_rxm"
    with pytest.raises(RuntimeError, match="no libfabric provider"):
        providers.choose([{"host": "a", "providers": ["tcp;ofi_rxm"]},
                          {"host": "b", "providers": ["udp;ofi_rxd"]}])


# --------------------------------------------------------------------------------------------
# Inputs and the NumPy oracle.
# --------------------------------------------------------------------------------------------

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


def expert_output(x_rows, scale_rows, experts, E, combine_dtype):
    """What the test's experts compute: (dequantized x) * (1 + e / E) + e / E, per row."""
    x = x_rows.astype(np.float32)
    if scale_rows is not None:
        x = x * np.repeat(scale_rows, 128, axis=-1)
    e = experts.astype(np.float32)[:, None]
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
    rel = 2.0 ** -7 if combine_dtype.itemsize == 2 else 1e-5
    err = np.abs(out.astype(np.float64) - want)
    assert (err <= rel * bound + 1e-6).all(), (
        f"combine differs by up to {err.max()} (bound {(rel * bound).max()})")
    assert not out[n:].astype(np.float32).any(), "rows past num_tokens not zero"


# --------------------------------------------------------------------------------------------
# The children: run by jax_efa_moe.launch in one process per rank.
# --------------------------------------------------------------------------------------------

def _setup(world):
    import jax

    return jax.make_mesh((world,), ("ep",), devices=jax.devices())


def _sharded(mesh, local):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("ep")), local)


def _local(array):
    return np.asarray(array.addressable_shards[0].data)


def _experts(comm, d):
    """The test's experts, applied to the per-expert layout (see expert_output)."""
    import jax
    import jax.numpy as jnp

    x = d.expert_x.astype(jnp.float32)
    if d.expert_x_scale is not None:
        x = x * jnp.repeat(d.expert_x_scale, 128, axis=1)
    local = jnp.searchsorted(jnp.cumsum(d.group_sizes), jnp.arange(comm.max_recv_tokens),
                             side="right")
    e = (jax.lax.axis_index("ep") * comm.local_experts + local).astype(jnp.float32)[:, None]
    E = comm.num_experts
    return (x * (1 + e / E) + e / E).astype(comm.combine_dtype)


def _programs(comm, mesh):
    """Jitted per-rank programs: whole calls, halves with work between them, and 100 steps
    in one fori_loop."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    def whole(x, ids, w, scale, n):
        d = comm.dispatch(x, ids, w, x_scale=scale if comm.has_scales else None,
                          num_tokens=n[0])
        out = comm.combine(_experts(comm, d), d.handle)
        return d.expert_x, d.expert_x_scale, d.expert_counts, d.group_sizes, out

    def halves(x, ids, w, scale, n):
        pending = comm.dispatch_send(x, ids, w, x_scale=scale if comm.has_scales else None,
                                     num_tokens=n[0])
        shared = jnp.tanh(x.astype(jnp.float32) @ x.astype(jnp.float32).T)
        d = comm.dispatch_recv(pending)
        sent = comm.combine_send(_experts(comm, d), d.handle)
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
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    return program(whole), program(halves), program(loop)


def check_cases(rank, world, args):
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll, _jem

    provider = None if args[0] == "auto" else args[0]
    options = transport_options(args[1:])
    mesh = _setup(world)
    R, T, H, k = world, 24 if world == 2 else 16, 256, 3
    E = 4 * R
    # (dispatch dtype, combine dtype, expert_alignment, max_recv_tokens, routings): the
    # default max_recv_tokens never overflows the private slots; the small one makes senders
    # use the overflow region.
    configs = [("bfloat16", "bfloat16", 1, None, ROUTINGS),
               ("float32", "float32", 8, None, ROUTINGS),
               ("float8_e4m3fn", "bfloat16", 1, None, ROUTINGS),
               ("bfloat16", "float32", 8, None, ROUTINGS),
               ("bfloat16", "bfloat16", 1, T + T // 2, OVERFLOW_ROUTINGS)]
    if world > 2:
        configs = configs[1:3] + configs[4:]
    rng = np.random.default_rng([SEED, 1234])
    checked = 0
    for dispatch_dtype, combine_dtype, align, max_recv_tokens, routings in configs:
        comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                        max_tokens_per_rank=T, dispatch_dtype=getattr(jnp, dispatch_dtype),
                        combine_dtype=getattr(jnp, combine_dtype), expert_alignment=align,
                        max_recv_tokens=max_recv_tokens, fabric_provider=provider,
                        timeout_s=30.0, **options)
        assert provider is None or comm.fabric_provider == provider, comm.fabric_provider
        whole, halves, loop = _programs(comm, mesh)
        cdt = np.dtype(comm.combine_dtype)
        for kind in routings:
            ids, num_tokens = make_routing(kind, rng, R, T, E, k)
            weights = rng.random((R, T, k)).astype(np.float32)
            x, scale = make_tokens(rng, R, T, H, dispatch_dtype)
            local_scale = scale[rank] if scale is not None else np.zeros((T, 0), np.float32)
            inputs = [_sharded(mesh, a) for a in
                      (x[rank], ids[rank], weights[rank], local_scale, num_tokens[rank:rank + 1])]
            got = [None if a is None else _local(a) for a in whole(*inputs)]
            where = f"{dispatch_dtype}/{combine_dtype}/align {align}/{kind}"
            try:
                check_dispatch(rank, R, E, align, ids, num_tokens, x, scale, got[:4])
                check_combine(rank, E, cdt, ids, weights, num_tokens, x, scale, got[4])
            except AssertionError as e:
                raise AssertionError(f"rank {rank}, {where}: {e}") from e
            checked += 1
            if kind in ("uniform", "partial", "overflow_peers"):
                split = [None if a is None else _local(a) for a in halves(*inputs)]
                if comm._contexts.platform == "gpu":
                    comm.raise_if_failed()  # a failed step explains any difference below
                names = ("expert_x", "expert_x_scale", "expert_counts", "group_sizes", "out")
                for name, a, b in zip(names, got, split):
                    if a is None and b is None:
                        continue
                    rows = np.flatnonzero((a.view(np.uint8) != b.view(np.uint8)).reshape(
                        a.shape[0], -1).any(axis=1)) if a.ndim else []
                    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), (
                        f"halves differ in {name}, rows {list(rows[:10])} of {len(rows)}: "
                        f"{where}")
            if kind == "zipf" and align == 1 and comm._contexts.platform == "cpu":
                before = _jem.context_steps(comm._contexts.context_id)
                assert _local(loop(*inputs))[0] == 0, f"100 steps changed the result: {where}"
                after = _jem.context_steps(comm._contexts.context_id)
                assert after[0] - before[0] == 100 and after[1] - before[1] == 100, after
            elif kind == "zipf" and align == 1:
                assert _local(loop(*inputs))[0] == 0, f"100 steps changed the result: {where}"
            if comm._contexts.platform == "gpu":
                comm.raise_if_failed()
        comm.close()
    print(f"rank {rank}: checked {checked} cases on {comm.fabric_provider}", flush=True)


def transport_options(args) -> dict:
    """AllToAll options from "name=value" arguments of a child: ranks_per_node, transport,
    num_nics, fabric_staging (the GPU path's node split, NICs and fabric buffer)."""
    options = {}
    for arg in args:
        name, value = arg.split("=", 1)
        if name in ("ranks_per_node", "num_nics"):
            options[name] = int(value)
        elif name == "fabric_staging":
            options[name] = {"none": None, "host": True, "device": False}[value]
        else:
            options[name] = value
    return options


def _expect_error(fn, *texts):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - JAX wraps FFI errors in its runtime error type
        message = str(e)
        assert any(t in message for t in texts), f"unexpected error: {message}"
        return message
    raise AssertionError(f"no error, expected one of {texts}")


def check_bad_input(rank, world, args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    mesh = _setup(world)
    R, T, H, k, E = world, 16, 128, 2, 8
    rng = np.random.default_rng([SEED, 7])
    ids, num_tokens = make_routing("uniform", rng, R, T, E, k)
    weights = rng.random((R, T, k)).astype(np.float32)
    x, _ = make_tokens(rng, R, T, H, "bfloat16")

    def new(**overrides):
        kw = dict(num_experts=E, experts_per_token=k, hidden=H, max_tokens_per_rank=T,
                  timeout_s=20.0)
        return AllToAll(mesh, "ep", **{**kw, **overrides})

    def run(comm, ids_r, n_r, x_r=None, w_r=None):
        def f(x, ids, w, n):
            d = comm.dispatch(x, ids, w, num_tokens=n[0])
            y = d.expert_x
            return comm.combine(y, d.handle), d.expert_counts

        program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        args = [x[rank] if x_r is None else x_r, ids_r, weights[rank] if w_r is None else w_r,
                np.array([n_r], np.int32)]
        return [_local(a) for a in program(*[_sharded(mesh, a) for a in args])]

    # Shapes and dtypes are refused in Python, before anything runs.
    comm = new()
    _expect_error(lambda: run(comm, ids[rank], T, x_r=x[rank][:, :64]), "has shape")
    _expect_error(lambda: run(comm, ids[rank], T, x_r=x[rank].astype(np.float32)), "dtype")
    _expect_error(lambda: run(comm, ids[rank].astype(np.float32), T), "dtype")
    _expect_error(lambda: run(comm, ids[rank][:, :1], T), "has shape")
    _expect_error(lambda: new(num_experts=7), "multiple")
    _expect_error(lambda: new(dispatch_dtype=jnp.float16), "dispatch_dtype")
    _expect_error(lambda: new(dispatch_dtype=jnp.float8_e4m3fn, hidden=100), "multiple of 128")
    _expect_error(lambda: new(fabric_provider="no-such-provider"), "no-such-provider")
    f32_out = new(combine_dtype=jnp.float32)
    _expect_error(lambda: run(f32_out, ids[rank], T), "expert_y has dtype bfloat16")
    f32_out.close()
    run(comm, ids[rank], T)  # still healthy

    # Results are typed as varying over the axis even when the operands are not (a fori_loop
    # carry or shard_map's checks rely on it).
    from jax_efa_moe.api import _varying_axes

    def from_constants(_):
        d = comm.dispatch(jnp.ones((T, H), jnp.bfloat16), jnp.zeros((T, k), jnp.int32),
                          jnp.ones((T, k), jnp.float32))
        assert "ep" in _varying_axes(d.expert_x), "dispatch results are not varying"
        out = comm.combine(d.expert_x, d.handle)
        assert "ep" in _varying_axes(out), "combine results are not varying"
        return out

    program = jax.jit(jax.shard_map(from_constants, mesh=mesh, in_specs=P("ep"),
                                    out_specs=P("ep")))
    out = _local(program(_sharded(mesh, np.zeros(1, np.float32))))
    assert (out.astype(np.float32) == 2).all(), "two slots of weight 1 on expert 0"

    # An expert id out of range on rank 0: rank 0 names it, the others learn at once.
    bad = ids[rank].copy()
    if rank == 0:
        bad[5, 1] = E
    start = time.monotonic()
    _expect_error(lambda: run(comm, bad, T), "topk_ids[5, 1] = 8 is not an expert id",
                  "rank 0 rejected its dispatch input")
    assert time.monotonic() - start < 10, "the error took as long as a timeout"
    _expect_error(lambda: run(comm, ids[rank], T), "failed earlier")
    comm.close()

    # num_tokens above the maximum (a traced value, so checked at run time) on rank 1.
    comm = new()
    _expect_error(lambda: run(comm, ids[rank], T + 1 if rank == 1 else T),
                  f"num_tokens = {T + 1} is outside", "rank 1 rejected its dispatch input")
    comm.close()

    # max_recv_tokens too small for the routing: every rank reaches the same verdict.
    comm = new(max_recv_tokens=T)
    crowded, _ = make_routing("one_expert", rng, R, T, E, k)
    message = _expect_error(lambda: run(comm, crowded[rank], T), "more than max_recv_tokens")
    assert f"needs {R * T} rows" in message, message
    comm.close()

    # The process is intact and a new AllToAll works; routing that fits a small buffer passes.
    comm = new(max_recv_tokens=R * T * k)
    out, counts = run(comm, ids[rank], T)
    assert counts.sum() == (ids // (E // R) == rank).sum(), counts
    comm.close()
    print(f"rank {rank}: bad input ok", flush=True)


def check_dead_peer(rank, world, args):
    import jax
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    mesh = _setup(world)
    T, H, k, E = 8, 128, 2, 4
    timeout_s = 3.0
    comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                    max_tokens_per_rank=T, timeout_s=timeout_s)
    rng = np.random.default_rng([SEED, 3])
    ids, _ = make_routing("uniform", rng, world, T, E, k)
    x, _ = make_tokens(rng, world, T, H, "bfloat16")
    weights = rng.random((world, T, k)).astype(np.float32)

    def f(x, ids, w):
        d = comm.dispatch(x, ids, w)
        return comm.combine(d.expert_x, d.handle)

    program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    inputs = [_sharded(mesh, a) for a in (x[rank], ids[rank], weights[rank])]
    # Compiled everywhere before the first step, so that a slow compile on loaded cores is not
    # mistaken for a dead peer under the short timeout.
    program = program.lower(*inputs).compile()
    bootstrap.all_gather_bytes("dead_peer_compiled", b"", rank, world)
    _local(program(*inputs))  # one good step: every rank is connected
    if rank == 1:
        sys.stdout.flush()
        launch.mark_left(rank)
        os._exit(0)  # dies without a word
    time.sleep(0.5)
    start = time.monotonic()
    message = _expect_error(lambda: _local(program(*inputs)), "peer", "rank 1")
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 5, f"the error took {elapsed:.1f} s"
    print(f"rank {rank}: dead peer reported after {elapsed:.1f} s: {message[:300]}", flush=True)
