"""AllToAll end to end on the CPU backend: 2 and 4 processes, one CPU device each.

Every rank draws every rank's inputs from one seed, drawn fresh for each run (printed, so a
failure can be replayed with JEM_TEST_SEED), so each can check its own results against the
NumPy oracle (oracle.py), independently of the C++ code. Many cases share one launch (each
launch costs a JAX start-up per process).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

import oracle
from jax_efa_moe import bootstrap, providers

SEED = oracle.SEED
# Set-up waits timeout_s for each peer, and on tcp a rank's close() sometimes takes 60 s (the
# engine's deadline for a task on the proxy thread, busy with a write, likely the last step's
# credits to a peer that closed first), so the next AllToAll's peers must wait longer.
SETUP_AFTER_CLOSE_S = 90.0


def _run(function: str, num_processes: int, *args: str, timeout_s: float = 240.0,
         env: dict[str, str] | None = None) -> list[str]:
    return oracle.run_children(f"test_all_to_all:{function}", num_processes, *args,
                               timeout_s=timeout_s, env=env)


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
    ids, num_tokens, weights, x, _ = oracle.make_inputs("unused_slots", rng, 1, T, E, k, H,
                                                        "float32")
    with AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                  max_tokens_per_rank=T, dispatch_dtype=jnp.float32,
                  combine_dtype=jnp.float32, expert_alignment=4) as comm:
        def f(x, ids, w):
            d = comm.dispatch(x, ids, w)
            return (d.expert_x, d.expert_counts, d.group_sizes,
                    comm.combine(oracle.experts(comm, d), d.handle))

        program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        got = [np.asarray(a) for a in program(*[_sharded(mesh, a[0]) for a in (x, ids, weights)])]
    oracle.check_dispatch(0, 1, E, 4, ids, num_tokens, x, None, (got[0], None, got[1], got[2]))
    oracle.check_combine(0, E, np.dtype(np.float32), ids, weights, num_tokens, x, None, got[3])


def test_custom_call_misuse_has_one_error_code_each():
    # The custom calls themselves, past AllToAll's checks in Python: each misuse has the code
    # cc/ffi/README.md gives it (the CUDA handlers share the code that decides).
    import jax
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll, ops

    mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices("cpu")[:1])
    T, H, k, E = 8, 128, 2, 4
    comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                    max_tokens_per_rank=T)
    op, cfg = comm._ops, comm.config
    x, scale = jnp.zeros((T, H), jnp.bfloat16), jnp.zeros((T, 0), jnp.float32)
    ids, w, n = jnp.zeros((T, k), jnp.int32), jnp.ones((T, k), jnp.float32), jnp.int32(T)
    sent, index = jnp.zeros((1,), jnp.int32), jnp.zeros((T, k), jnp.int32)

    def expect(code, words, call, *operands):
        message = oracle.expect_error(
            lambda: jax.block_until_ready(jax.jit(lambda *a: call(op, *a))(*operands)), words)
        assert f"{code}: " in message, message

    send = ops.dispatch_send
    expect("INVALID_ARGUMENT", "dispatch_send: x has shape [8, 64], expected [8, 128].",
           send, x[:, :64], scale, ids, w, n)
    expect("INVALID_ARGUMENT", "dispatch_send: topk_ids has dtype float32, expected int32.",
           send, x, scale, w, w, n)
    expect("INVALID_ARGUMENT", "combine_recv takes 4 operands, got 3.",
           lambda op, *a: ops._call("jem_combine_recv", ops._out(cfg), op, *a),
           sent, sent, index)
    # Halves out of order: the caller's to fix, and (on CPU) it ends the context.
    expect("INVALID_ARGUMENT", "called without a combine_send before it",
           ops.combine_recv, sent, sent, index, n)
    expect("FAILED_PRECONDITION", "failed earlier", send, x, scale, ids, w, n)
    comm.close()
    expect("NOT_FOUND", "no all-to-all context", send, x, scale, ids, w, n)


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


def check_cases(rank, world, args):
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll, _jem

    provider = None if args[0] == "auto" else args[0]
    options = oracle.transport_options(args[1:])
    mesh = _setup(world)
    R, T, H, k = world, 24 if world == 2 else 16, 256, 3
    E = 4 * R
    # (dispatch dtype, combine dtype, expert_alignment, max_recv_tokens, routings): the
    # default max_recv_tokens never overflows the private slots; the small one makes senders
    # use the overflow region.
    configs = [("bfloat16", "bfloat16", 1, None, oracle.ROUTINGS),
               ("float32", "float32", 8, None, oracle.ROUTINGS),
               ("float8_e4m3fn", "bfloat16", 1, None, oracle.ROUTINGS),
               ("bfloat16", "float32", 8, None, oracle.ROUTINGS),
               ("bfloat16", "bfloat16", 1, T + T // 2, oracle.OVERFLOW_ROUTINGS)]
    if world > 2:
        configs = configs[1:3] + configs[4:]
    rng = np.random.default_rng([SEED, 1234])
    checked = 0
    for dispatch_dtype, combine_dtype, align, max_recv_tokens, routings in configs:
        comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                        max_tokens_per_rank=T, dispatch_dtype=getattr(jnp, dispatch_dtype),
                        combine_dtype=getattr(jnp, combine_dtype), expert_alignment=align,
                        max_recv_tokens=max_recv_tokens, fabric_provider=provider,
                        timeout_s=SETUP_AFTER_CLOSE_S, **options)
        assert provider is None or comm.fabric_provider == provider, comm.fabric_provider
        whole, halves, loop = oracle.programs(comm, mesh)
        cdt = np.dtype(comm.combine_dtype)
        for kind in routings:
            ids, num_tokens, weights, x, scale = oracle.make_inputs(kind, rng, R, T, E, k, H,
                                                                    dispatch_dtype)
            local_scale = scale[rank] if scale is not None else np.zeros((T, 0), np.float32)
            inputs = [_sharded(mesh, a) for a in
                      (x[rank], ids[rank], weights[rank], local_scale, num_tokens[rank:rank + 1])]
            got = [None if a is None else _local(a) for a in whole(*inputs)]
            where = f"{dispatch_dtype}/{combine_dtype}/align {align}/{kind}"
            try:
                oracle.check_dispatch(rank, R, E, align, ids, num_tokens, x, scale, got[:4])
                oracle.check_combine(rank, E, cdt, ids, weights, num_tokens, x, scale, got[4])
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
        times = comm.fabric_times()  # GPUs: the proxy timed every step it served
        assert times is None or comm.fabric_provider is None or all(
            t[phase]["steps"] >= len(routings) for t in times for phase in t), times
        comm.close()
    print(f"rank {rank}: checked {checked} cases on {comm.fabric_provider}", flush=True)


def check_bad_input(rank, world, args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    mesh = _setup(world)
    R, T, H, k, E = world, 16, 128, 2, 8
    rng = np.random.default_rng([SEED, 7])
    ids, num_tokens, weights, x, _ = oracle.make_inputs("uniform", rng, R, T, E, k, H,
                                                        "bfloat16")

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
    oracle.expect_error(lambda: run(comm, ids[rank], T, x_r=x[rank][:, :64]), "has shape")
    oracle.expect_error(lambda: run(comm, ids[rank], T, x_r=x[rank].astype(np.float32)), "dtype")
    oracle.expect_error(lambda: run(comm, ids[rank].astype(np.float32), T), "dtype")
    oracle.expect_error(lambda: run(comm, ids[rank][:, :1], T), "has shape")
    oracle.expect_error(lambda: new(num_experts=7), "multiple")
    oracle.expect_error(lambda: new(dispatch_dtype=jnp.float16), "dispatch_dtype")
    oracle.expect_error(lambda: new(dispatch_dtype=jnp.float8_e4m3fn, hidden=100),
                        "multiple of 128")
    oracle.expect_error(lambda: new(fabric_provider="no-such-provider"), "no-such-provider")
    f32_out = new(combine_dtype=jnp.float32)
    oracle.expect_error(lambda: run(f32_out, ids[rank], T), "expert_y has dtype bfloat16")
    f32_out.close()
    run(comm, ids[rank], T)  # still healthy

    # Results are typed as varying over the axis even when the operands are not (a fori_loop
    # carry or shard_map's checks rely on it).
    from jax_efa_moe.config import varying_axes

    def from_constants(_):
        d = comm.dispatch(jnp.ones((T, H), jnp.bfloat16), jnp.zeros((T, k), jnp.int32),
                          jnp.ones((T, k), jnp.float32))
        assert "ep" in varying_axes(d.expert_x), "dispatch results are not varying"
        out = comm.combine(d.expert_x, d.handle)
        assert "ep" in varying_axes(out), "combine results are not varying"
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
    oracle.expect_error(lambda: run(comm, bad, T), "topk_ids[5, 1] = 8 is not an expert id",
                  "rank 0 rejected its dispatch input")
    assert time.monotonic() - start < 10, "the error took as long as a timeout"
    oracle.expect_error(lambda: run(comm, ids[rank], T), "failed earlier")
    comm.close()

    # num_tokens above the maximum (a traced value, so checked at run time) on rank 1.
    comm = new()
    oracle.expect_error(lambda: run(comm, ids[rank], T + 1 if rank == 1 else T),
                  f"num_tokens = {T + 1} is outside", "rank 1 rejected its dispatch input")
    comm.close()

    # max_recv_tokens too small for the routing: every rank reaches the same verdict.
    comm = new(max_recv_tokens=T)
    crowded, _ = oracle.make_routing("one_expert", rng, R, T, E, k)
    message = oracle.expect_error(lambda: run(comm, crowded[rank], T),
                                  "more than max_recv_tokens")
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
    ids, _, weights, x, _ = oracle.make_inputs("uniform", rng, world, T, E, k, H, "bfloat16")

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
    # Every rank has its results before rank 1 dies: a rank's step may end before its own last
    # writes have left, and a crash then loses them.
    bootstrap.all_gather_bytes("dead_peer_good_step", b"", rank, world)
    if rank == 1:
        sys.stdout.flush()
        os._exit(0)  # dies without a word
    time.sleep(0.5)
    start = time.monotonic()
    message = oracle.expect_error(lambda: _local(program(*inputs)), "peer", "rank 1")
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 5, f"the error took {elapsed:.1f} s"
    print(f"rank {rank}: dead peer reported after {elapsed:.1f} s: {message[:300]}", flush=True)
