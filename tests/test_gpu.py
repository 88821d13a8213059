"""AllToAll on CUDA GPUs, over NVLink in both process models (one process driving two GPUs,
and two processes with one GPU each: ``jax.distributed``, CUDA IPC between them), and through
the fabric: ranks on different "nodes" (``ranks_per_node``) reached by the proxy thread over
libfabric, every rank a process, several processes sharing one GPU where there are fewer
GPUs than ranks (correct, not fast). Fabric tests run with delivery reordering on
(JEM_REORDER_SEED): immediates and completions arrive in a random order, as on EFA.

The routings, the inputs and the NumPy checks are the CPU suite's (oracle.py), so the GPU path
is held to the same results. Errors differ in timing only: kernels report them into a
status the host reads afterwards, so a bad step raises at ``raise_if_failed()`` (or at the
next call), not at the call itself. With XLA's default flags the whole ops may run inside
command buffers (CUDA graphs that XLA replays without calling them); the command_buffer tests
make sure they do, and check every replayed step. Every test runs in child processes, so that
the pytest process never holds a GPU. Skipped without GPUs (CI has none); the NVLink tests
marked two_gpus need two.

JEM_FABRIC_STAGING=host|device|none picks the fabric buffer of the fabric tests (none: GPU
memory where the provider registers it, else pinned host memory).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import oracle
from jax_efa_moe import launch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SEED = oracle.SEED
NO_COMMAND_BUFFERS = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}


def _gpus() -> int:
    try:
        from jax_efa_moe import _jem
    except ImportError:
        return 0
    return _jem.cuda_device_count() if _jem.has_cuda else 0


two_gpus = pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
pytestmark = pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU")
STAGING = os.environ.get("JEM_FABRIC_STAGING", "none")


def _env(extra: dict | None = None) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "NCCL_NVLS_ENABLE": "0",
           "JEM_TEST_SEED": str(SEED)}
    print(f"JEM_TEST_SEED={SEED}")
    env.update(extra or {})
    return env


def _two_processes(function: str, *args: str, env: dict | None = None,
                   timeout_s: float = 400.0) -> list[str]:
    return launch.run(f"test_gpu:{function}", 2, list(args), timeout_s=timeout_s,
                      env=_env(env), platform="cuda")


def _fabric(function: str, world: int, *args: str, env: dict | None = None,
            timeout_s: float = 400.0) -> list[str]:
    """`function` in one process per rank, delivery reordered, fabric buffer per STAGING."""
    reorder = {"JEM_REORDER_SEED": os.environ.get("JEM_REORDER_SEED", str(SEED % 1000 + 1))}
    return launch.run(function, world, [*args, f"fabric_staging={STAGING}"],
                      timeout_s=timeout_s, env=_env({**reorder, **(env or {})}),
                      platform="cuda")


def _one_process(function: str, *args: str, env: dict | None = None,
                 timeout_s: float = 400.0) -> str:
    code = f"import sys, test_gpu; test_gpu.{function}(0, 1, sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **_env(env)},
                          capture_output=True, text=True, timeout=timeout_s)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    return out


# --------------------------------------------------------------------------------------------
# The parent side: what pytest runs.
# --------------------------------------------------------------------------------------------

@two_gpus
def test_one_process_two_gpus_every_routing_and_dtype():
    out = _one_process("check_cases", "all")
    assert "checked 4 configs" in out, out[-3000:]


@two_gpus
def test_one_process_without_command_buffers():
    out = _one_process("check_cases", "fp8", env=NO_COMMAND_BUFFERS)
    assert "checked 1 configs" in out, out[-3000:]


@two_gpus
def test_two_processes_every_routing():
    outputs = _two_processes("check_cases", "two")
    assert all("checked 2 configs" in o for o in outputs), outputs


@two_gpus
def test_two_processes_without_command_buffers():
    outputs = _two_processes("check_cases", "fp8", env=NO_COMMAND_BUFFERS)
    assert all("checked 1 configs" in o for o in outputs), outputs


@two_gpus
def test_bad_input_one_process():
    out = _one_process("check_bad_input")
    assert "bad input ok" in out, out[-3000:]


@two_gpus
def test_bad_input_two_processes():
    outputs = _two_processes("check_bad_input")
    assert all("bad input ok" in o for o in outputs), outputs


@two_gpus
def test_dead_peer_two_processes():
    outputs = _two_processes("check_dead_peer", timeout_s=200.0)
    assert "dead peer reported" in outputs[0], outputs


# The autodiff suite (test_autodiff.py) on GPUs, one process per GPU: its oracle is JAX's
# autodiff of the stock path, whose ragged_all_to_all XLA runs between processes only as NCCL
# send/recv (NCCL refuses two ranks on one GPU, hence two GPUs).
@two_gpus
@pytest.mark.parametrize("function,says", [("check_op_gradients", "op gradients ok"),
                                           ("check_layer_gradients", "layer gradients ok"),
                                           ("check_finite_differences", "finite differences ok")])
def test_gradients_two_processes(function, says):
    fallback = "--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"
    oracle.check_children(f"test_autodiff:{function}", 2, says, timeout_s=600.0,
                          env=_env({"XLA_FLAGS": fallback}), platform="cuda")


# Gradients against the NumPy derivatives of the test's experts (test_autodiff.py), with no
# collective of XLA's, so that processes sharing one GPU run it: over NVLink between them, and
# through the fabric.
@pytest.mark.parametrize("transport", ["nvlink", "fabric"])
def test_gradients_against_numpy(transport):
    outputs = _fabric("test_autodiff:check_gradients_against_numpy", 2, f"transport={transport}")
    assert all("numpy gradients ok" in o for o in outputs), outputs


# Every rank a node of its own, through the fabric: the CPU suite's routings, dtypes,
# alignments, halves and 100 steps in one jit; at EP4 each GPU's peers split over two NICs.
@pytest.mark.parametrize("world,provider,nics", [(2, "shm", 1), (4, "tcp;ofi_rxm", 2),
                                                 (8, "shm", 1)])
def test_fabric_every_routing(world, provider, nics):
    outputs = _fabric("test_all_to_all:check_cases", world, provider, "transport=fabric",
                      f"num_nics={nics}")
    assert all("checked" in o for o in outputs), outputs


def test_fabric_tcp_two_ranks_without_command_buffers():
    outputs = _fabric("test_all_to_all:check_cases", 2, "tcp;ofi_rxm", "transport=fabric",
                      env=NO_COMMAND_BUFFERS)
    assert all("checked" in o for o in outputs), outputs


# The NVLink path between processes that share one GPU (CUDA IPC), the staged send included.
def test_nvlink_processes_sharing_a_gpu():
    outputs = _fabric("test_all_to_all:check_cases", 2, "auto", "transport=nvlink")
    assert all("checked" in o for o in outputs), outputs


# Under a small SM budget every kernel's grid shrinks to max_sms blocks, each taking its work
# in several pieces: the CPU suite's routings, halves and 100 steps again, over NVLink (one GPU
# shared by both processes, or one GPU each) and through the fabric.
@pytest.mark.parametrize("transport,provider,max_sms", [("nvlink", "auto", 1),
                                                        ("nvlink", "auto", 3),
                                                        ("fabric", "shm", 3)])
def test_sm_budget_every_routing(transport, provider, max_sms):
    outputs = _fabric("test_all_to_all:check_cases", 2, provider, f"transport={transport}",
                      f"max_sms={max_sms}")
    assert all("checked" in o for o in outputs), outputs


def test_sm_budget_past_the_gpu_is_refused():
    outputs = _fabric("test_gpu:check_sm_budget_range", 2, "transport=nvlink")
    assert all("sm budget range ok" in o for o in outputs), outputs


# Two nodes of two ranks: NVLink (CUDA IPC) inside a node, the fabric across.
def test_hybrid_two_nodes_of_two():
    outputs = _fabric("test_all_to_all:check_cases", 4, "shm", "ranks_per_node=2")
    assert all("checked" in o for o in outputs), outputs


def test_fabric_bad_input():
    outputs = _fabric("test_gpu:check_bad_input", 2, "transport=fabric", "fabric_provider=shm")
    assert all("bad input ok" in o for o in outputs), outputs


def test_fabric_dead_peer():
    outputs = _fabric("test_gpu:check_dead_peer", 2, "transport=fabric",
                      "fabric_provider=tcp;ofi_rxm", timeout_s=200.0)
    assert "dead peer reported" in outputs[0], outputs


# XLA's command buffers: the whole ops, then the halves, captured into CUDA graphs and replayed
# without their handlers (100 steps in one jit each, every step checked against the oracle);
# XLA's optimized HLO must hold each call once and its thunk dump show each inside a command
# buffer. Two processes: on one GPU they share it, on two the staged send uses the copy engine.
@pytest.mark.parametrize("transport", ["nvlink", "fabric"])
def test_command_buffers_processes(transport):
    provider = ["fabric_provider=shm"] if transport == "fabric" else []
    outputs = _fabric("test_gpu:check_command_buffers", 2, f"transport={transport}", *provider)
    print(outputs[0][-6000:])
    assert all("command buffers ok" in o for o in outputs), outputs


@two_gpus
def test_command_buffers_one_process_two_gpus():
    out = _one_process("check_command_buffers")
    print(out[-6000:])
    assert "command buffers ok" in out, out[-3000:]


# WHILE added to XLA's command types (it is not a default), so that XLA may capture the loop
# itself. On the H200 (jax 0.11.2) XLA still ran the loop from the host, and captured each
# step's body, halves included, as one command buffer.
def test_command_buffers_with_while_in_graphs():
    outputs = _fabric("test_gpu:check_command_buffers", 2, "transport=nvlink", "graphs=while",
                      env={"XLA_FLAGS": WHILE_IN_GRAPHS})
    print(outputs[0][-6000:])
    assert all("command buffers ok" in o for o in outputs), outputs


# --------------------------------------------------------------------------------------------
# The children.
# --------------------------------------------------------------------------------------------

def _mesh():
    import jax

    return jax.make_mesh((2,), ("ep",), devices=jax.devices()[:2])


def _local_ranks(mesh) -> list[int]:
    import jax

    return [r for r, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]


def _put(mesh, per_rank):
    """A global array sharded over "ep" from the full per-rank list (this process's part)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    local = np.concatenate([per_rank[r] for r in _local_ranks(mesh)])
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("ep")), local)


def _get(array) -> dict[int, np.ndarray]:
    """This process's per-rank blocks of a result sharded over "ep", by rank."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows = array.shape[0] // 2
    return {(s.index[0].start or 0) // rows: np.asarray(s.data) for s in shards}


def check_cases(rank, world, args):
    import jax.numpy as jnp
    from jax_efa_moe import AllToAll

    mesh = _mesh()
    R, T, H, k = 2, 24, 256, 3
    E = 4 * R
    configs = {
        "all": [("bfloat16", "bfloat16", 1), ("float32", "float32", 8),
                ("float8_e4m3fn", "bfloat16", 1), ("bfloat16", "float32", 8)],
        "two": [("float8_e4m3fn", "bfloat16", 8), ("float32", "float32", 1)],
        "fp8": [("float8_e4m3fn", "bfloat16", 1)],
    }[args[0]]
    rng = np.random.default_rng([SEED, 1234])
    for dispatch_dtype, combine_dtype, align in configs:
        comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                        max_tokens_per_rank=T, dispatch_dtype=getattr(jnp, dispatch_dtype),
                        combine_dtype=getattr(jnp, combine_dtype), expert_alignment=align,
                        timeout_s=30.0)
        assert comm.fabric_provider is None, comm.fabric_provider  # NVLink only
        whole, halves, loop = oracle.programs(comm, mesh)
        cdt = np.dtype(comm.combine_dtype)
        for kind in oracle.ROUTINGS:
            ids, num_tokens, weights, x, scale = oracle.make_inputs(kind, rng, R, T, E, k, H,
                                                                    dispatch_dtype)
            scales = scale if scale is not None else np.zeros((R, T, 0), np.float32)
            inputs = [_put(mesh, a) for a in (x, ids, weights, scales, num_tokens[:, None])]
            got = [None if a is None else _get(a) for a in whole(*inputs)]
            comm.raise_if_failed()
            where = f"{dispatch_dtype}/{combine_dtype}/align {align}/{kind}"
            for r in _local_ranks(mesh):
                mine = [None if a is None else a[r] for a in got]
                try:
                    oracle.check_dispatch(r, R, E, align, ids, num_tokens, x, scale, mine[:4])
                    oracle.check_combine(r, E, cdt, ids, weights, num_tokens, x, scale, mine[4])
                except AssertionError as e:
                    raise AssertionError(f"rank {r}, {where}: {e}") from e
            if kind in ("uniform", "partial"):
                split = [None if a is None else _get(a) for a in halves(*inputs)]
                for a, b in zip(got, split):
                    for r in _local_ranks(mesh):
                        assert (a is None and b is None) or np.array_equal(
                            a[r].view(np.uint8), b[r].view(np.uint8)), f"halves differ: {where}"
            if kind == "zipf":
                mismatches = _get(loop(*inputs))
                assert all(m[0] == 0 for m in mismatches.values()), (
                    f"100 steps changed the result: {where}")
            comm.raise_if_failed()
        comm.close()
    print(f"ranks {_local_ranks(mesh)}: checked {len(configs)} configs x {len(oracle.ROUTINGS)} "
          f"routings on {comm.fabric_provider or 'NVLink'}", flush=True)


def check_bad_input(rank, world, args):
    import jax
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    options = oracle.transport_options(args)
    mesh = _mesh()
    R, T, H, k, E = 2, 16, 128, 2, 8
    rng = np.random.default_rng([SEED, 7])
    ids, _, weights, x, _ = oracle.make_inputs("uniform", rng, R, T, E, k, H, "bfloat16")

    def new(**overrides):
        kw = dict(num_experts=E, experts_per_token=k, hidden=H, max_tokens_per_rank=T,
                  timeout_s=20.0, **options)
        return AllToAll(mesh, "ep", **{**kw, **overrides})

    def run(comm, ids_all, n_all):
        def f(x, ids, w, n):
            d = comm.dispatch(x, ids, w, num_tokens=n[0])
            y = d.expert_x.astype(comm.combine_dtype)
            return comm.combine(y, d.handle), d.expert_counts

        program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        outs = program(*[_put(mesh, a) for a in (x, ids_all, weights,
                                                 np.array(n_all, np.int32)[:, None])])
        jax.block_until_ready(outs)
        return outs

    def failing_step(comm, ids_all, n_all, *texts):
        # The error is raised by the program itself when the kernels that found it finish
        # before the host enqueues the step's next op, and by raise_if_failed otherwise.
        def step():
            run(comm, ids_all, n_all)
            comm.raise_if_failed()
        return oracle.expect_error(step, *texts)

    # Shapes and dtypes are refused in Python, before anything runs.
    comm = new()
    oracle.expect_error(lambda: comm.dispatch(x[0][:, :64], ids[0], weights[0]), "has shape")
    oracle.expect_error(lambda: comm.dispatch(x[0].astype(np.float32), ids[0], weights[0]),
                      "dtype")
    run(comm, ids, [T, T])
    comm.raise_if_failed()  # still healthy

    # An expert id out of range on rank 0: rank 0 names it, the others learn from its route row.
    bad = ids.copy()
    bad[0, 5, 1] = E
    start = time.monotonic()
    message = failing_step(comm, bad, [T, T], "topk_ids[5, 1] = 8 is not an expert id",
                           "rank 0 failed before packing")
    assert time.monotonic() - start < 10, "the error took as long as a timeout"
    oracle.expect_error(lambda: run(comm, ids, [T, T]), "failed earlier")
    print(f"bad expert: {message[:200]}", flush=True)
    comm.close()

    # num_tokens above the maximum (a traced value, so checked on the GPU) on rank 1.
    comm = new()
    failing_step(comm, ids, [T, T + 1], f"num_tokens = {T + 1} is outside",
                 "rank 1 failed before packing")
    comm.close()

    # max_recv_tokens too small for the routing: every rank reaches the same verdict.
    comm = new(max_recv_tokens=T)
    crowded, _ = oracle.make_routing("one_expert", rng, R, T, E, k)
    message = failing_step(comm, crowded, [T, T], "more than max_recv_tokens")
    assert f"needs {R * T} rows" in message, message
    comm.close()

    # Halves out of order: the host refuses them while it sees every call, the kernels once
    # XLA has captured a call into a command buffer (raise_if_failed then reports them).
    def send_twice(comm, x, ids, w):
        comm.dispatch_send(x, ids, w)
        return comm.dispatch_recv(comm.dispatch_send(x, ids, w)).expert_counts

    def recv_twice(comm, x, ids, w):
        pending = comm.dispatch_send(x, ids, w)
        comm.dispatch_recv(pending)
        return comm.dispatch_recv(pending).expert_counts

    for halves, says in ((send_twice, "twice without dispatch_recv"),
                         (recv_twice, "without a dispatch_send before it")):
        comm = new()
        program = jax.jit(jax.shard_map(lambda *a: halves(comm, *a), mesh=mesh,
                                        in_specs=P("ep"), out_specs=P("ep")))

        def step():
            jax.block_until_ready(program(*[_put(mesh, a) for a in (x, ids, weights)]))
            comm.raise_if_failed()

        print(f"{halves.__name__}: {oracle.expect_error(step, says)[:200]}", flush=True)
        comm.close()

    # A new AllToAll works; routing that fits a small buffer passes.
    comm = new(max_recv_tokens=R * T * k)
    out, counts = run(comm, ids, [T, T])
    comm.raise_if_failed()
    for r, c in _get(counts).items():
        assert c.sum() == (ids // (E // R) == r).sum(), (r, c)
    comm.close()
    print(f"ranks {_local_ranks(mesh)}: bad input ok", flush=True)


def check_sm_budget_range(rank, world, args):
    """A budget past this GPU's SMs fails in Python, on every rank, before anything opens."""
    import jax
    from jax_efa_moe import AllToAll, _jem

    sms = _jem.cuda_device_sms(int(jax.local_devices()[0].local_hardware_id))
    oracle.expect_error(
        lambda: AllToAll(_mesh(), "ep", num_experts=4, experts_per_token=2, hidden=128,
                         max_tokens_per_rank=8, max_sms=sms + 1, timeout_s=20.0,
                         **oracle.transport_options(args)),
        f"max_sms = {sms + 1} is more than the {sms} SMs of GPU")
    print(f"rank {rank}: sm budget range ok ({sms} SMs)", flush=True)


def check_dead_peer(rank, world, args):
    import jax
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    mesh = _mesh()
    T, H, k, E = 8, 128, 2, 4
    timeout_s = 3.0
    comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                    max_tokens_per_rank=T, timeout_s=timeout_s, **oracle.transport_options(args))
    rng = np.random.default_rng([SEED, 3])
    ids, _, weights, x, _ = oracle.make_inputs("uniform", rng, 2, T, E, k, H, "bfloat16")

    def f(x, ids, w):
        d = comm.dispatch(x, ids, w)
        return comm.combine(d.expert_x, d.handle)

    program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    inputs = [_put(mesh, a) for a in (x, ids, weights)]
    jax.block_until_ready(program(*inputs))  # one good step: both ranks are connected
    comm.raise_if_failed()
    if rank == 1:
        sys.stdout.flush()
        os._exit(0)  # dies without a word
    time.sleep(0.5)
    start = time.monotonic()

    def step_then_check():
        jax.block_until_ready(program(*inputs))
        comm.raise_if_failed()

    message = oracle.expect_error(step_then_check, "timed out", "rank 1")
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 10, f"the error took {elapsed:.1f} s"
    print(f"rank {rank}: dead peer reported after {elapsed:.1f} s: {message[:300]}", flush=True)
    os._exit(0)  # skip teardown: the dead peer's arena is gone


COMMAND_BUFFER_STEPS = 100
# XLA's default command types plus WHILE (XLA_FLAGS: a compile option does not take the +
# form), and the compile option for none.
WHILE_IN_GRAPHS = "--xla_gpu_enable_command_buffer=+WHILE"
UNCAPTURED = {"xla_gpu_enable_command_buffer": ""}


def check_command_buffers(rank, world, args):
    """A jitted loop of COMMAND_BUFFER_STEPS steps (dispatch, the test's experts with a matmul
    beside them, combine; whole ops, then the halves), each step's routing, weights and
    num_tokens derived from the step number, every step checked against the oracle; an
    uncaptured step before and after each loop (its staged copies precede a replayed send)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import AllToAll

    graphs = "while" if "graphs=while" in args else "default"
    options = oracle.transport_options([a for a in args if not a.startswith("graphs=")])
    mesh = _mesh()
    R, T, H, k = 2, 24, 256, 3
    E = 4 * R
    comm = AllToAll(mesh, "ep", num_experts=E, experts_per_token=k, hidden=H,
                    max_tokens_per_rank=T, timeout_s=60.0, differentiable=False, **options)
    rng = np.random.default_rng([SEED, 4321])
    ids, num_tokens, weights, x, _ = oracle.make_inputs("uniform", rng, R, T, E, k, H,
                                                        "bfloat16")
    inputs = [_put(mesh, a) for a in (x, ids, weights, num_tokens[:, None])]
    cdt = np.dtype(comm.combine_dtype)

    def step(halves, x, ids, w, n, i):
        """Step i of a rank: experts rotated by i, weights scaled by 1 + i, n - i % 5 tokens."""
        ids = jnp.where(ids >= 0, (ids + i) % E, ids)
        w = w * (1 + i).astype(jnp.float32)
        n = n - i % 5
        xf = x.astype(jnp.float32)
        if halves:
            pending = comm.dispatch_send(x, ids, w, num_tokens=n)
            shared = jnp.tanh(xf @ xf.T)  # work between the halves, as a layer has
            d = comm.dispatch_recv(pending)
            out = comm.combine_recv(comm.combine_send(oracle.experts(comm, d), d.handle))
        else:
            d = comm.dispatch(x, ids, w, num_tokens=n)
            shared = jnp.tanh(xf @ xf.T)
            out = comm.combine(oracle.experts(comm, d), d.handle)
        return d.expert_x, d.expert_counts, d.group_sizes, out, shared.sum()[None]

    def expect(i, got):
        """Step i's results (per rank of this process) against the oracle."""
        ids_i = np.where(ids >= 0, (ids + i) % E, ids).astype(np.int32)
        w_i = weights * np.float32(1 + i)
        n_i = (num_tokens - i % 5).astype(np.int32)
        for r in _local_ranks(mesh):
            expert_x, counts, groups, out, shared = (a[r] for a in got)
            try:
                oracle.check_dispatch(r, R, E, 1, ids_i, n_i, x, None,
                                      (expert_x, None, counts, groups))
                oracle.check_combine(r, E, cdt, ids_i, w_i, n_i, x, None, out)
                assert np.isfinite(shared).all(), shared
            except AssertionError as e:
                raise AssertionError(f"rank {r}, step {i}, {graphs}: {e}") from e

    def program(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    for halves in (False, True):
        kind = "halves" if halves else "whole ops"
        one = program(lambda x, ids, w, n, i: step(halves, x, ids, w, n[0], i[0]))
        one = one.lower(*inputs, _put(mesh, np.zeros((R, 1), np.int32))).compile(UNCAPTURED)

        def uncaptured(i):
            got = one(*inputs, _put(mesh, np.full((R, 1), i, np.int32)))
            expect(i, [_get(a) for a in got])

        def loop(x, ids, w, n):
            steps = jnp.arange(COMMAND_BUFFER_STEPS, dtype=jnp.int32)
            return jax.lax.scan(lambda c, i: (c, step(halves, x, ids, w, n[0], i)), None,
                                steps)[1]

        dump = tempfile.mkdtemp(prefix=f"jem_xla_dump_r{rank}_")
        compiled = program(loop).lower(*inputs).compile(
            {"xla_dump_to": dump})
        calls = 4 if halves else 2
        print(f"{kind}: {_command_buffer_placement(compiled, dump, calls)}",
              flush=True)
        shutil.rmtree(dump)

        uncaptured(7)
        got = [_get(a) for a in compiled(*inputs)]
        comm.raise_if_failed()
        for i in range(COMMAND_BUFFER_STEPS):
            expect(i, [{r: a[r][i] for r in a} for a in got])
        uncaptured(COMMAND_BUFFER_STEPS + 3)
        comm.raise_if_failed()
    comm.close()
    print(f"ranks {_local_ranks(mesh)}: command buffers ok ({graphs}, "
          f"{comm.fabric_provider or 'NVLink'}, {COMMAND_BUFFER_STEPS} steps)", flush=True)


def _command_buffer_placement(compiled, dump: str, calls: int) -> str:
    """Fails unless ``compiled`` holds the program's ``calls`` jem custom calls (XLA cloned
    none) and XLA put every one inside a command buffer; returns the lines that show it. The
    program holds no other custom call. XLA forms command buffers from its thunk sequence,
    which it dumps (--xla_dump_to) as *thunk_sequence_after_thunk_passes.txt once a pass
    changed it: nested thunks are indented under theirs, e.g. kCustomCall under
    kCommandBuffer."""
    hlo = compiled.as_text()
    targets = re.findall(r'custom_call_target="(jem_\w+)"', hlo)
    assert len(targets) == calls, (
        f"the compiled HLO holds {len(targets)} jem custom calls, the program {calls}:\n"
        f"{_jem_calls(hlo)}")
    converted = sorted(glob.glob(os.path.join(dump, "*thunk_sequence_after_thunk_passes*.txt")))
    if not converted:
        written = sorted(os.listdir(dump))
        raise AssertionError(
            f"XLA converted no thunk into a command buffer (no "
            f"*thunk_sequence_after_thunk_passes*.txt in {dump}: {written[:20]}); the custom "
            f"calls {targets} run uncaptured, or this XLA forms command buffers otherwise (older "
            f"ones: HLO computations named command_buffer, in compiled.as_text())")
    inside, outside, lines = [], [], []
    for path in converted:
        enclosing = []  # (indent, kind) of the thunks around the current line
        with open(path) as f:
            for line in f:
                m = re.match(r"( *)(?:\d+: )?(k[A-Z]\w*)", line)
                if not m:
                    continue
                indent, kind = len(m.group(1)), m.group(2)
                while enclosing and enclosing[-1][0] >= indent:
                    enclosing.pop()
                if kind in ("kCommandBuffer", "kCustomCall", "kWhile"):
                    lines.append(line.rstrip())
                if kind == "kCustomCall":
                    in_buffer = any(k == "kCommandBuffer" for _, k in enclosing)
                    (inside if in_buffer else outside).append(line.strip())
                enclosing.append((indent, kind))
    excerpt = "\n".join(lines)
    assert not outside and len(inside) == calls, (
        f"{len(outside)} custom-call thunks outside a command buffer and {len(inside)} inside, "
        f"for {calls} jem custom calls {targets}, all expected inside; XLA's thunks:\n{excerpt}")
    return (f"{calls} jem custom calls inside command buffers "
            f"({', '.join(os.path.basename(p) for p in converted)}):\n{excerpt}")


def _jem_calls(hlo: str) -> str:
    """The jem custom calls and while loops of an HLO module, under their computations."""
    lines, header = [], None
    for line in hlo.splitlines():
        if re.match(r"^\S.*\{$", line):  # a computation's header
            header = line.split("(")[0]
        elif "jem_" in line or " while(" in line:
            if header:
                lines.append(header)
                header = None
            name, _, rest = line.strip().partition(" = ")
            target = re.search(r'custom_call_target="(jem_\w+)"', rest)
            lines.append(f"    {name} = {target.group(1) if target else rest[:200]}")
    return "\n".join(lines)