"""AllToAll set-up and lifetime across 2 CPU processes, tried as a careless user would.

Ranks built with different arguments (even ones with the same bytes per record) must fail on
every rank, naming what differs; a constructor failing on one rank must fail on every rank
within timeout_s; an AllToAll dropped without close() must release everything. Each test is
one short launch of 2 processes.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np

import oracle


_check = oracle.child_checker("test_setup", timeout_s=180.0)


def test_different_arguments_on_two_ranks_fail_on_both():
    _check("check_mismatches", "mismatches ok")


def test_a_constructor_failing_on_one_rank_fails_on_every_rank_within_timeout():
    _check("check_one_rank_fails", "failures ok")


def test_dropped_without_close_releases_everything():
    _check("check_drop_without_close", "drop ok")


# --------------------------------------------------------------------------------------------
# The children: run by jax_efa_moe.launch in one process per rank.
# --------------------------------------------------------------------------------------------

T, H, K, E = 16, 256, 2, 8


def _mesh():
    import jax

    return jax.make_mesh((2,), ("ep",), devices=jax.devices())


def _new(mesh, **overrides):
    from jax_efa_moe import AllToAll

    kw = dict(num_experts=E, experts_per_token=K, hidden=H, max_tokens_per_rank=T,
              timeout_s=10.0)
    return AllToAll(mesh, "ep", **{**kw, **overrides})


def _checked_step(comm, mesh, stream: int):
    """One dispatch and combine on fresh inputs, checked against the oracle."""
    whole, _, _ = oracle.programs(comm, mesh)
    rng = np.random.default_rng([oracle.SEED, stream])
    oracle.run_checked(comm, mesh, whole, "uniform", rng)


def _fails_everywhere(mesh, rank, mine: dict, theirs: dict, *texts, timeout_s=10.0):
    """Builds with ``mine`` on rank 0 and ``theirs`` on rank 1; both must raise at once."""
    start = time.monotonic()
    args = {"timeout_s": timeout_s, **(mine if rank == 0 else theirs)}
    message = oracle.expect_error(lambda: _new(mesh, **args), *texts)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s, f"rank {rank} took {elapsed:.1f} s: {message}"
    return message


def check_mismatches(rank, world, args):
    import jax.numpy as jnp

    mesh = _mesh()
    # The same bytes per record (256 x 2 = 128 x 4): nothing in the data would tell.
    message = _fails_everywhere(
        mesh, rank, dict(hidden=256, dispatch_dtype=jnp.bfloat16),
        dict(hidden=128, dispatch_dtype=jnp.float32),
        "different arguments on different ranks")
    for part in ("hidden: rank 0 has 256, rank 1 has 128",
                 "dispatch_dtype: rank 0 has bfloat16, rank 1 has float32"):
        assert part in message, message
    assert "max_tokens_per_rank" not in message, message
    for mine, theirs, part in [
            (dict(max_tokens_per_rank=T), dict(max_tokens_per_rank=2 * T),
             f"max_tokens_per_rank: rank 0 has {T}, rank 1 has {2 * T}"),
            (dict(expert_alignment=1), dict(expert_alignment=4),
             "expert_alignment: rank 0 has 1, rank 1 has 4"),
            (dict(max_recv_tokens=None), dict(max_recv_tokens=2 * T),
             f"max_recv_tokens: rank 0 has {2 * T * K}, rank 1 has {2 * T}"),
            (dict(combine_dtype=jnp.bfloat16), dict(combine_dtype=jnp.float32),
             "combine_dtype: rank 0 has bfloat16, rank 1 has float32"),
            (dict(), dict(fabric_provider="tcp;ofi_rxm"),
             "fabric_provider: rank 0 has None, rank 1 has tcp;ofi_rxm")]:
        _fails_everywhere(mesh, rank, mine, theirs, part)
    # What may differ does not fail, and set-up is still in step after the failures.
    comm = _new(mesh, timeout_s=10.0 + rank, zero_unused_rows=rank == 0)
    _checked_step(comm, mesh, 1)
    comm.close()
    print(f"rank {rank}: mismatches ok", flush=True)


def check_one_rank_fails(rank, world, args):
    import jax.numpy as jnp
    from jax_efa_moe import _jem

    mesh = _mesh()
    # Arguments only rank 1 gets wrong: it raises its own error, rank 0 names rank 1's.
    for bad, texts in [(dict(num_experts=7), ("must be a multiple of the 2 ranks",)),
                       (dict(timeout_s=float("inf")), ("finite number of seconds",)),
                       (dict(dispatch_dtype=jnp.float8_e4m3fn, hidden=100),
                        ("must be a multiple of 128",))]:
        message = _fails_everywhere(mesh, rank, {}, bad, *texts)
        if rank == 0:
            assert "failed on rank 1 (step 'config')" in message, message

    # Failures past the arguments, injected on rank 1: the arena, then joining the peers.
    for step, name in [("contexts", "create_context"), ("connected", "connect_context")]:
        real = getattr(_jem, name)
        if rank == 1:
            def broken(*a, **kw):
                raise RuntimeError(f"injected failure of {name}")
            setattr(_jem, name, broken)
        try:
            message = _fails_everywhere(mesh, rank, {}, {}, f"injected failure of {name}")
        finally:
            setattr(_jem, name, real)
        if rank == 0:
            assert f"failed on rank 1 (step '{step}')" in message, message

    # Nothing is left behind: both ranks still build and run one.
    comm = _new(mesh)
    _checked_step(comm, mesh, 2)
    comm.close()

    # A rank that never comes: the other gives up after timeout_s, not 120 s. (Last: the
    # ranks' set-up keys are out of step after a timeout.)
    if rank == 0:
        start = time.monotonic()
        oracle.expect_error(lambda: _new(mesh, timeout_s=2.0), "within 2 s")
        elapsed = time.monotonic() - start
        assert elapsed < 5.0, f"set-up gave up after {elapsed:.1f} s with timeout_s = 2"
    print(f"rank {rank}: failures ok", flush=True)


def _usage() -> tuple[int, int, int]:
    """(resident bytes, open fds, threads) of this process."""
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss, len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def check_drop_without_close(rank, world, args):
    from jax_efa_moe import _jem

    mesh = _mesh()
    # A 4096-wide f32 arena is a few MB, and the shm provider maps a region per engine: each
    # leaked instance would add a proxy thread and over 8 MB.
    big = dict(hidden=4096, dispatch_dtype=np.float32, combine_dtype=np.float32)
    usage = []
    for i in range(8):
        comm = _new(mesh, **big)
        context = comm._contexts.context_id
        if i < 2:  # traffic first; later rounds leave out compiles, whose RSS is noise
            _checked_step(comm, mesh, 3 + i)
        del comm
        gc.collect()
        oracle.expect_error(lambda: _jem.context_steps(context), "no all-to-all context")
        usage.append(_usage())
    print(f"rank {rank}: (RSS, fds, threads) per round {usage}", flush=True)
    # From the first round without a step on: JAX may still start threads after a step, and
    # may close a socket of its own at any time, so only growth counts.
    assert all(u[1] <= usage[2][1] and u[2] <= usage[2][2] for u in usage[2:]), (
        f"fds or threads grew: {usage}")
    grown = usage[-1][0] - usage[3][0]
    assert grown < 8 << 20, f"RSS grew by {grown >> 20} MB in 4 rounds: {usage}"
    print(f"rank {rank}: drop ok", flush=True)
