"""Dispatch/combine latency: ours against the stock JAX paths, on the same inputs in one run.

    python benchmarks/bench_all_to_all.py                           # CPU, 2 processes
    python benchmarks/bench_all_to_all.py --platform=cuda --tokens=128,4096 --plot
    python benchmarks/bench_all_to_all.py --platform=cuda --processes=2 --ranks_per_node=1 \
        --impls=ours --name=a2a_fabric_cuda      # the fabric (proxy) path between 2 GPUs

Implementations: ``ours`` (``jax_efa_moe.AllToAll``), ``ragged`` (the MaxText-style
``ReferenceAllToAll``: sort by expert, ``jax.lax.ragged_all_to_all``; on CPU, where XLA lacks
that op, its exchange is a padded all_to_all) and ``padded`` (``PaddedAllToAll``, the padded
``jax.lax.all_to_all`` round trip).

Per tokens-per-rank and implementation, after checking that combine(dispatch(x)) gives x times
its summed router weights, inside one ``jax.jit``:
- dispatch: a ``lax.fori_loop`` of ``--iters`` dispatches (``--iters=1``: one step, no loop,
  for XLA ops that hang inside loops); round trip: the same of
  dispatch+combine; combine = round trip - dispatch, repeat by repeat. Median and p99 over
  ``--repeats`` loops, per step. XLA:GPU starts each step of a while loop from the host; loop
  alone times that loop with nothing in it, and ``--unroll`` unrolls every loop instead.
- each send/recv half: one jitted call per half, timed with block_until_ready (launch
  included), median and p99 over the repeats.
- bytes: what must cross between ranks (a token once per remote destination rank for
  dispatch: its row plus fp8 scales; one combine-dtype row per (token, remote rank) for
  combine), and the bytes each implementation actually puts on the wire; GB/s and the fraction
  of a measured ceiling. Ceiling on GPU: a 1 GiB peer copy between GPU 0 and 1; on CPU:
  loopback TCP between two threads (the path gloo and libfabric's tcp provider take), with
  a memcpy figure beside it.
- overlap: dispatch_send, a bf16 matmul sized to take about a dispatch, dispatch_recv,
  against the serial sum of the two.

``--max_sms=none,16,32`` times ours once per SM budget (``AllToAll(max_sms=...)``; none: every
SM), each a run of its own (latencies, halves, overlap; ``max_sms`` in the results), against
the same matmul. What to expect: the halves enqueue their kernels on XLA's stream, which runs
its ops one after another, so the matmul starts only once dispatch_send's kernel has finished
and dispatch_recv's starts only after the matmul. A budget cannot give the matmul SMs the
kernels hold there; it only makes the kernels slower. What does overlap the matmul here uses
no SMs: the copy engine moving the staged send over NVLink, the proxy thread and the NIC on
the fabric path. A budget pays where kernels run at the same time: ``--matmul_stream=1`` also
times the matmul on a second XLA stream (``compute_on("gpu_stream:1")``), beside
dispatch_recv's kernel.

On GPUs the default is one process driving every GPU, where XLA runs ``ragged_all_to_all``
natively. With ``--processes=N`` (one process per GPU), XLA refuses it as a multi-host op
unless ``--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true`` is set (this script
sets it then); seen with jax 0.11.2 on 2 H200s: one step per jit is right, but a jit holding
several ragged dispatch steps did not finish.

Writes ``<out>/<name>.json`` and ``.md`` (date, machine, command) and, with ``--plot``, a PNG
of latency against tokens per rank (needs matplotlib; ``--replot=FILE.json`` redraws one).

``--training`` times one MoE layer instead, forward and forward+backward (``jax.grad``), ours
against the stock path (default tokens 128,4096; ``training_<platform>`` files): router, float8
quantisation, dispatch, the experts, combine, a loss. The experts scale each row by a learned
per-expert factor: XLA:CPU computes ``ragged_dot`` densely over every local expert, which at
128 local experts and H=7168 would take minutes per step and measure nothing of the exchange
(a per-expert vector costs a scatter of every row into it in the backward pass, slower than the
exchanges on the CPU). Each
implementation's gradients (of x, the router and the experts) are checked against the first
stock implementation's before it is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

import bench_report
from jax_efa_moe.timing import summary, time_calls

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AXIS = "ep"
DTYPES = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "f32": "float32"}
RAGGED_MULTIPROCESS_FLAG = "--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"

flags.DEFINE_list("tokens", None, "Tokens per rank; default 16,64,128 on CPU, 128,4096 on GPU.")
flags.DEFINE_integer("hidden", 7168, "Hidden size.")
flags.DEFINE_integer("experts", 256, "Routed experts.")
flags.DEFINE_integer("topk", 8, "Experts per token.")
flags.DEFINE_enum("dispatch_dtype", "fp8", list(DTYPES), "Dispatch dtype (fp8: e4m3 + f32 scales).")
flags.DEFINE_enum("combine_dtype", "bf16", ["bf16", "f32"], "Combine dtype.")
flags.DEFINE_list("impls", ["ours", "ragged", "padded"], "Implementations to time.")
flags.DEFINE_enum("platform", "auto", ["auto", "cpu", "cuda"], "auto: cuda where GPUs exist.")
flags.DEFINE_integer("processes", 0, "0: 2 on CPU (a device each), 1 on cuda (every GPU); "
                     "on cuda N > 1 gives process i GPU i.")
flags.DEFINE_enum("transport", "auto", ["auto", "fabric", "nvlink"],
                  "ours: AllToAll(transport=...); fabric times the proxy path between GPUs.")
flags.DEFINE_integer("ranks_per_node", None, "ours: AllToAll(ranks_per_node=...); 1 puts every "
                     "peer on another node (the fabric path), None: the processes' hosts.")
flags.DEFINE_string("fabric_provider", None, "ours: libfabric provider (default: found).")
flags.DEFINE_integer("iters", None, "Steps per timed loop; default 5 on CPU, 50 on GPU.")
flags.DEFINE_bool("unroll", False, "Unroll the timed loops: no while loop, whose every step XLA "
                  "starts from the host; the steps run back to back in one program (one command "
                  "buffer where XLA captures).")
flags.DEFINE_integer("repeats", None, "Timed loops per measurement; default 10 CPU, 50 GPU.")
flags.DEFINE_bool("overlap", True, "Measure send / matmul / recv overlap.")
flags.DEFINE_integer("matmul_stream", 0, "GPU: also time the overlap with the matmul on XLA's "
                     "stream N (jax.experimental.compute_on('gpu_stream:N')), where it can run "
                     "beside dispatch_recv's kernel; 0: only on the kernels' stream.")
flags.DEFINE_list("max_sms", ["none"], "ours: SM budgets (AllToAll(max_sms=...)), each timed as "
                  "a run of its own; none: every SM (not --training).")
flags.DEFINE_bool("stock_check", False, "Stock paths validate routing through a host callback.")
flags.DEFINE_string("out", os.path.join(HERE, "results"), "Results folder.")
flags.DEFINE_string("name", None, "File name stem; default a2a_<platform>.")
flags.DEFINE_bool("plot", False, "Also write a PNG of latency against tokens per rank.")
flags.DEFINE_string("replot", None, "Only redraw the .md (and .png) of this results JSON.")
flags.DEFINE_integer("seed", 0, "Routing and data seed.")
flags.DEFINE_bool("training", False, "Time one MoE layer's forward and backward instead.")
flags.DEFINE_multi_string("note", [], "A sentence for the results' notes (repeatable).")
flags.DEFINE_float("grad_rtol", 2 ** -5, "--training: largest max|ours - stock| / max|stock| "
                   "of a gradient.")
flags.DEFINE_float("timeout_s", 1800.0, "Deadline for the whole run.")
flags.DEFINE_bool("trace", False, "Also trace one dispatch loop and one round-trip loop with "
                  "jax.profiler and report the device time per step of each kernel and copy "
                  "(GPU; where the step's time goes besides our kernels).")
FLAGS = flags.FLAGS


# ---- ceilings (measured in the parent, before the ranks start) -------------------------------

def loopback_tcp_gbps(total=1 << 28, chunk=1 << 22) -> float:
    """One-way bytes/s through a TCP connection on 127.0.0.1 between two threads."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    sender = socket.create_connection(server.getsockname())
    receiver, _ = server.accept()
    buf = bytearray(chunk)

    def drain():
        view, left = memoryview(bytearray(chunk)), total
        while left:
            left -= receiver.recv_into(view, min(chunk, left))

    t = threading.Thread(target=drain)
    t0 = time.perf_counter()
    t.start()
    for _ in range(total // chunk):
        sender.sendall(buf)
    t.join(timeout=120)
    seconds = time.perf_counter() - t0
    for s in (sender, receiver, server):
        s.close()
    return total / seconds / 1e9


def memcpy_gbps(total=1 << 28) -> float:
    src, dst = np.ones(total, np.uint8), np.empty(total, np.uint8)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    return 5 * total / (time.perf_counter() - t0) / 1e9


_PEER_COPY = r"""
import time, torch
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda:0")
b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize(0); torch.cuda.synchronize(1)
t = time.perf_counter()
for _ in range(10):
    b.copy_(a)
torch.cuda.synchronize(0); torch.cuda.synchronize(1)
print(10 * n / (time.perf_counter() - t) / 1e9)
"""


def peer_copy_gbps() -> float | None:
    """GB/s of a 1 GiB copy GPU 0 -> GPU 1 (PyTorch, peer access), in its own process."""
    out = subprocess.run([sys.executable, "-c", _PEER_COPY], capture_output=True, text=True,
                         timeout=300)
    if out.returncode:
        print(f"peer copy ceiling not measured: {out.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return float(out.stdout.strip().splitlines()[-1])


# ---- one rank ------------------------------------------------------------------------------

_T0 = time.perf_counter()


def _progress(what):
    """A timestamped line on stderr, so a slow or stuck step shows where it is."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


def _timed(fn, args, repeats):
    _progress(f"compile and time {getattr(fn, '__name__', 'fn')}")
    return time_calls(fn, args, repeats)


def _budgets() -> list[int | None]:
    """--max_sms as AllToAll arguments."""
    if not FLAGS.max_sms or not all(b == "none" or b.isdigit() and int(b) > 0
                                    for b in FLAGS.max_sms):
        raise app.UsageError(f"--max_sms takes 'none' or positive counts of SMs, got "
                             f"{FLAGS.max_sms}")
    return [None if b == "none" else int(b) for b in FLAGS.max_sms]


def _label(run) -> str:
    """An implementation in the reports: ours under an SM budget names it."""
    return run["impl"] + (f" ({run['max_sms']} SMs)" if run.get("max_sms") else "")


def _make(impl, mesh, T, max_sms=None):
    import jax.numpy as jnp
    kw = dict(num_experts=FLAGS.experts, experts_per_token=FLAGS.topk, hidden=FLAGS.hidden,
              max_tokens_per_rank=T, dispatch_dtype=jnp.dtype(DTYPES[FLAGS.dispatch_dtype]),
              combine_dtype=jnp.dtype(DTYPES[FLAGS.combine_dtype]))
    if impl == "ours":
        from jax_efa_moe import AllToAll
        return AllToAll(mesh, AXIS, differentiable=FLAGS.training, transport=FLAGS.transport,
                        ranks_per_node=FLAGS.ranks_per_node,
                        fabric_provider=FLAGS.fabric_provider, max_sms=max_sms, **kw)
    from jax_efa_moe.reference import PaddedAllToAll, ReferenceAllToAll
    return (ReferenceAllToAll if impl == "ragged" else PaddedAllToAll)(
        mesh, AXIS, check=FLAGS.stock_check, **kw)


def _routing(rng, T, E, k):
    return np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)


def _bytes(ids_all, R, T, H, S):
    """Per-rank mean bytes that must cross ranks, and what each stock path sends."""
    E, k = FLAGS.experts, FLAGS.topk
    L = E // R
    size = {"fp8": 1, "bf16": 2, "f32": 4}
    row = H * size[FLAGS.dispatch_dtype] + 4 * S
    crow = H * size[FLAGS.combine_dtype]
    pairs = copies = 0
    for r in range(R):
        dest = ids_all[r] // L
        for d in range(R):
            if d != r:
                pairs += int((dest == d).any(axis=1).sum())
                copies += int((dest == d).sum())
    pairs, copies = pairs / R, copies / R
    capacity = T * k
    return {"dispatch": pairs * row, "combine": pairs * crow,
            "ragged_wire": {"dispatch": copies * row, "combine": copies * crow},
            "padded_wire": {"dispatch": (R - 1) * capacity * row,
                            "combine": (R - 1) * capacity * crow}}


class _Flat:
    """Moves a pytree of per-rank arrays (handles, pending halves) in and out of shard_map."""

    def __init__(self):
        self.treedef = self.shapes = None

    def out(self, tree):
        leaves, self.treedef = __import__("jax").tree.flatten(tree)
        self.shapes = [leaf.shape for leaf in leaves]
        return [leaf.reshape((1,) + leaf.shape) for leaf in leaves]

    def into(self, leaves):
        import jax
        return jax.tree.unflatten(self.treedef, [l.reshape(s) for l, s in zip(leaves, self.shapes)])


def _varying(v):
    """v marked as differing per rank, so loop carries type-check whatever an op marks."""
    import jax
    t = jax.typeof(v)
    vma = t.vma if hasattr(t, "vma") else t.manual_axis_type.varying  # named per jax version
    return v if AXIS in vma else jax.lax.pcast(v, AXIS, to="varying")


def _varying_zeros(shape, dtype):
    import jax.numpy as jnp
    return _varying(jnp.zeros(shape, dtype))


def _sharded(mesh):
    """jit(shard_map(f)) with every argument and result split over the EP axis."""
    import jax
    from jax.sharding import PartitionSpec as P
    return lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


def _loop(iters, body, init):
    """fori_loop (unrolled with --unroll), or the body once when iters == 1 (no while loop in
    the program)."""
    import jax
    if iters == 1:
        return body(0, init)
    return jax.lax.fori_loop(0, iters, body, init, unroll=True if FLAGS.unroll else 1)


def _check_round_trip(comm, mesh, inputs, x_of, w_of):
    """Before timing: combine(dispatch(x).expert_x) must give x times its summed weights
    (every slot routed), within a few roundings of the combine dtype."""
    import jax.numpy as jnp
    from jax_efa_moe import per_rank

    def round_trip(x, sc, ids, w):
        d = comm.dispatch(x, ids, w, x_scale=sc)
        return comm.combine(d.expert_x.astype(comm.combine_dtype), d.handle)
    got = per_rank.get(_sharded(mesh)(round_trip)(*inputs), mesh, AXIS)
    cdt = jnp.dtype(comm.combine_dtype)
    for r, out in got.items():
        y = x_of(r).astype(np.float32).astype(cdt).astype(np.float64)
        want = y * w_of(r).astype(np.float64).sum(1, keepdims=True)
        err = np.abs(out.astype(np.float64) - want)
        if not (err <= 2.0 ** -6 * np.abs(want) + 1e-6).all():
            raise AssertionError(f"rank {r}: combine(dispatch(x)) differs from x * sum(weights) "
                                 f"by up to {err.max():.3g}; nothing timed")


def _measure(comm, mesh, inputs, expert_y, iters, repeats):
    import jax
    import jax.numpy as jnp

    shard = _sharded(mesh)
    nan_guard = lambda out, ids: jnp.where(jnp.isnan(out[0, 0].astype(jnp.float32)), -1, ids)

    def dispatch_loop(x, sc, ids, w):
        shape = jax.eval_shape(lambda: comm.dispatch(x, ids, w, x_scale=sc).expert_x)

        def body(_, c):
            ids, _ = c
            d = comm.dispatch(x, ids, w, x_scale=sc)
            return jnp.where(d.expert_counts.sum() < 0, -1, ids), _varying(d.expert_x)
        return _loop(iters, body, (ids, _varying_zeros(shape.shape, shape.dtype)))[1]

    def round_trip_loop(x, sc, ids, w, y):
        shape = jax.eval_shape(lambda: comm.dispatch(x, ids, w, x_scale=sc).expert_x)

        # expert_x is carried too, or XLA would drop the stock paths' token exchange.
        def body(_, c):
            ids, _, _ = c
            d = comm.dispatch(x, ids, w, x_scale=sc)
            out = comm.combine(y, d.handle)
            return nan_guard(out, ids), _varying(d.expert_x), _varying(out)
        init = (ids, _varying_zeros(shape.shape, shape.dtype), _varying_zeros(x.shape, y.dtype))
        return _loop(iters, body, init)[1:]

    # The loop's own cost per step: its counter, the carry, and the while loop's trip to the host.
    def empty_loop(x, sc, ids, w):
        return _loop(iters, lambda _, ids: jnp.where(ids.sum() < 0, -1, ids), ids)

    res = {}
    d_loop = shard(dispatch_loop)
    rt_loop = shard(round_trip_loop)
    d_times = _timed(d_loop, inputs, repeats)
    rt_times = _timed(rt_loop, inputs + (expert_y,), repeats)
    empty_times = _timed(shard(empty_loop), inputs, repeats)
    res["loop_us"] = {"empty": summary(empty_times, iters),
                      "dispatch": summary(d_times, iters),
                      "round_trip": summary(rt_times, iters),
                      "combine": summary(np.subtract(rt_times, d_times), iters)}

    # The halves, one jitted call each; pending state and handles cross as per-rank arrays.
    fs, fh, fc = _Flat(), _Flat(), _Flat()
    send = shard(lambda x, sc, ids, w: fs.out(comm.dispatch_send(x, ids, w, x_scale=sc)))
    jax.eval_shape(send, *inputs)

    def recv_fn(*leaves):
        d = comm.dispatch_recv(fs.into(leaves))
        return d.expert_x, d.expert_counts, fh.out(d.handle)
    recv = shard(recv_fn)
    csend = shard(lambda y, *h: fc.out(comm.combine_send(y, fh.into(h))))
    crecv = shard(lambda *leaves: comm.combine_recv(fc.into(leaves)))
    half = {k: [] for k in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")}
    _progress("time the send/recv halves")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        p = jax.block_until_ready(send(*inputs))
        t1 = time.perf_counter()
        _, _, h = jax.block_until_ready(recv(*p))
        t2 = time.perf_counter()
        c = jax.block_until_ready(csend(expert_y, *h))
        t3 = time.perf_counter()
        jax.block_until_ready(crecv(*c))
        t4 = time.perf_counter()
        if i:  # the first round compiles
            for name, dt in zip(half, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                half[name].append(dt)
    res["per_call_us"] = {name: summary(v, 1) for name, v in half.items()}
    if FLAGS.trace:
        res["device_us_per_step"] = {"dispatch": _device_time(d_loop, inputs, iters),
                                     "round_trip": _device_time(rt_loop, inputs + (expert_y,),
                                                                iters)}
    return res


def _device_time(fn, args, iters):
    """One traced call of fn (after a warm one): per kernel or copy on the device, its count
    and its µs per step, largest first, and the span from the first device event's start to the
    last one's end per step. Empty where the trace has no GPU plane (XLA:CPU)."""
    import glob
    import tempfile

    import jax

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(*args))
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0]) if files else None
    per_name, first, last = {}, None, None
    gpu = [p for p in (data.planes if data else ()) if p.name.startswith("/device:GPU")]
    lines = [line for p in gpu for line in p.lines]
    # Each kernel and copy is an event on its stream's line; other lines ("XLA Ops") repeat them.
    streams = [line for line in lines if line.name.startswith("Stream")] or lines
    for line in streams:
        for e in line.events:
            n, t = per_name.get(e.name, (0, 0.0))
            per_name[e.name] = (n + 1, t + e.duration_ns)
            first = e.start_ns if first is None else min(first, e.start_ns)
            last = max(last or 0.0, e.start_ns + e.duration_ns)
    kernels = sorted(({"name": name, "count_per_step": n / iters, "us_per_step": t / 1e3 / iters}
                      for name, (n, t) in per_name.items()), key=lambda k: -k["us_per_step"])
    return {"kernels": kernels, "lines": sorted({line.name for line in lines}),
            "busy_us_per_step": sum(k["us_per_step"] for k in kernels),
            "span_us_per_step": (last - first) / 1e3 / iters if kernels else 0.0}


def _matmul_loop(n, iters):
    import jax.numpy as jnp

    def run(a, b):
        return _loop(iters, lambda _, a: jnp.dot(a, b).astype(jnp.bfloat16), a)
    return run


def _overlap(comm, mesh, inputs, iters, repeats, n, dispatch_us):
    """dispatch_send, an n x n bf16 matmul, dispatch_recv; against matmul and dispatch alone.
    With --matmul_stream, again with the matmul on that stream, free to run beside the recv."""
    import jax
    import jax.numpy as jnp

    shard = _sharded(mesh)

    def overlapped(stream):
        matmul = jax.jit(lambda a, b: jnp.dot(a, b).astype(jnp.bfloat16))
        if stream:
            import inspect

            from jax.experimental.compute_on import compute_on
            where = f"gpu_stream:{stream}"
            if "out_memory_spaces" in inspect.signature(compute_on).parameters:  # jax >= 0.11
                matmul = compute_on(compute_type=where,
                                    out_memory_spaces=jax.memory.Space.Device)(matmul)
            else:
                matmul = compute_on(where)(matmul)

        def run(x, sc, ids, w):
            a, b = jnp.ones((n, n), jnp.bfloat16), jnp.full((n, n), 1.0 / n, jnp.bfloat16)
            shape = jax.eval_shape(lambda: comm.dispatch(x, ids, w, x_scale=sc).expert_x)

            def body(_, c):
                ids, a, _ = c
                pending = comm.dispatch_send(x, ids, w, x_scale=sc)
                pending, a = jax.lax.optimization_barrier((pending, a))
                a = matmul(a, b)
                if not stream:  # one stream: the recv after the matmul, not before it
                    pending, a = jax.lax.optimization_barrier((pending, a))
                d = comm.dispatch_recv(pending)
                return (jnp.where(d.expert_counts.sum() < 0, -1, ids), _varying(a),
                        _varying(d.expert_x))
            init = (ids, _varying(a), _varying_zeros(shape.shape, shape.dtype))
            _, a, ex = _loop(iters, body, init)
            return a, ex
        return run

    mm_t = _timed(shard(_matmul_only(n, iters)), inputs, repeats)
    matmul_us = float(np.median(mm_t)) * 1e6 / iters
    serial = matmul_us + dispatch_us

    def result(stream):
        fn = shard(overlapped(stream))
        overlapped_us = float(np.median(_timed(fn, inputs, repeats))) * 1e6 / iters
        res = {"overlapped_us": overlapped_us,
               "hidden_fraction": (serial - overlapped_us) / max(min(matmul_us, dispatch_us), 1e-9)}
        if FLAGS.trace:  # busy above span: kernels ran at the same time
            res["device_us_per_step"] = _device_time(fn, inputs, iters)
        return res

    res = {"matmul_n": n, "matmul_us": matmul_us, "dispatch_us": dispatch_us, "serial_us": serial,
           **result(0)}
    if FLAGS.matmul_stream:
        try:
            res["second_stream"] = {"stream": FLAGS.matmul_stream, **result(FLAGS.matmul_stream)}
        except Exception as e:  # compute_on's streams are experimental: say why, keep the rest
            res["second_stream"] = {"stream": FLAGS.matmul_stream, "error": f"{type(e).__name__}: {e}"[:300]}
    return res


def _matmul_only(n, iters):
    """Per rank: the n x n bf16 matmul loop alone, its operands made on the device."""
    import jax.numpy as jnp

    def run(x, sc, ids, w):
        a = jnp.ones((n, n), jnp.bfloat16) + x[:1, :1].astype(jnp.bfloat16) * 0
        return _matmul_loop(n, iters)(a, jnp.full((n, n), 1.0 / n, jnp.bfloat16))
    return run


def _calibrate_matmul(mesh, inputs, target_us, iters, repeats):
    """n (multiple of 128) whose n x n bf16 matmul takes about target_us per rank."""
    n = 512
    for _ in range(3):
        f = _sharded(mesh)(_matmul_only(n, iters))
        us = float(np.median(_timed(f, inputs, max(3, repeats // 5)))) * 1e6 / iters
        n = int(max(128, min(16384, round(n * (target_us / us) ** (1 / 3) / 128) * 128)))
    return n


def _training_layer(comm):
    """Per rank: the loss <layer(x), ct> of one MoE layer (see the module doc) as an [1] array."""
    import jax.numpy as jnp
    from jax_efa_moe import moe

    L, M = FLAGS.experts // comm.num_ranks, comm.max_recv_tokens

    def loss(x, router, scales, ct):
        ids, w = moe.route(x, router, FLAGS.topk)
        xq, sc = moe.quantize_fp8(x) if FLAGS.dispatch_dtype == "fp8" else (
            x.astype(comm.dispatch_dtype), None)
        d = comm.dispatch(xq, ids, w, x_scale=sc)
        ex = (moe.dequantize_fp8(d.expert_x, d.expert_x_scale, jnp.bfloat16) if sc is not None
              else d.expert_x.astype(jnp.bfloat16))
        local = jnp.searchsorted(jnp.cumsum(d.group_sizes), jnp.arange(M), side="right")
        y = (ex * scales[jnp.minimum(local, L - 1)][:, None]).astype(comm.combine_dtype)
        out = comm.combine(y, d.handle)
        return jnp.sum(out.astype(jnp.float32) * ct)[None]
    return loss


def _training_runs(mesh, tokens, repeats):
    """Per T and implementation: forward and forward+backward ms, gradient errors."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_efa_moe import per_rank

    R, H, E = mesh.shape[AXIS], FLAGS.hidden, FLAGS.experts
    stock = next(i for i in FLAGS.impls if i != "ours")
    order = [stock] + [i for i in FLAGS.impls if i != stock]
    runs = []
    for T in tokens:
        def block(r, what, shape, dtype=np.float32):
            g = np.random.default_rng([FLAGS.seed, T, r, what])
            return g.standard_normal(shape, np.float32).astype(dtype)

        x = per_rank.put(mesh, AXIS, lambda r: block(r, 0, (T, H), jnp.bfloat16))
        ct = per_rank.put(mesh, AXIS, lambda r: block(r, 1, (T, H)))
        router = (block(0, 2, (H, E)) / H ** 0.5).astype(jnp.bfloat16)  # replicated
        scales = per_rank.put(mesh, AXIS, lambda r: 1 + 0.1 * block(r, 3, (E // R,)))
        reference = None
        for impl in order:
            comm = _make(impl, mesh, T)
            layer = jax.shard_map(_training_layer(comm), mesh=mesh,
                                  in_specs=(P(AXIS), P(), P(AXIS), P(AXIS)), out_specs=P(AXIS))
            forward = jax.jit(lambda x, router, scales, ct: jnp.sum(layer(x, router, scales, ct)))
            backward = jax.jit(jax.value_and_grad(forward, argnums=(0, 1, 2)))
            _progress(f"T={T} {impl}: gradients")
            grads = [np.asarray(g.addressable_shards[0].data, np.float32)
                     for g in jax.block_until_ready(backward(x, router, scales, ct)[1])]
            entry = {"tokens": T, "impl": impl, "max_recv_tokens": comm.max_recv_tokens}
            if reference is None:
                reference = grads
            else:
                errors = {name: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                          for name, a, b in zip(("x", "router", "experts"), grads, reference)}
                entry["grad_rel_error_vs_" + stock] = errors
                if max(errors.values()) > FLAGS.grad_rtol:
                    raise AssertionError(f"T={T} {impl}: gradients differ from {stock}'s: "
                                         f"{errors} (--grad_rtol={FLAGS.grad_rtol})")
            fwd = _timed(forward, (x, router, scales, ct), repeats)
            both = _timed(backward, (x, router, scales, ct), repeats)
            comm.close()
            entry.update(forward_ms=summary(fwd, unit=1e3),
                         forward_backward_ms=summary(both, unit=1e3))
            runs.append(entry)
            _progress(f"T={T} {impl}: forward {entry['forward_ms']['median']:.1f} ms, "
                      f"forward+backward {entry['forward_backward_ms']['median']:.1f} ms")
    return runs


def worker(rank, world, args):
    """Each rank runs every measurement; rank 0 prints the results as one JSON line."""
    FLAGS(["bench_all_to_all"] + list(args))
    import jax
    import jax.numpy as jnp
    from jax_efa_moe import per_rank

    mesh = per_rank.ep_mesh(AXIS)
    R = mesh.shape[AXIS]
    cpu = jax.devices()[0].platform == "cpu"
    if FLAGS.training:
        repeats = FLAGS.repeats or 5
        runs = _training_runs(mesh, [int(t) for t in FLAGS.tokens or ["128", "4096"]], repeats)
        if rank == 0:
            print("BENCH_JSON " + json.dumps({"meta": _meta(R, world, repeats=repeats),
                                              "runs": runs}))
        return
    budgets = _budgets()
    tokens = [int(t) for t in (FLAGS.tokens or (["16", "64", "128"] if cpu else ["128", "4096"]))]
    iters = FLAGS.iters or (20 if cpu else 50)
    repeats = FLAGS.repeats or (10 if cpu else 50)
    H, E, k = FLAGS.hidden, FLAGS.experts, FLAGS.topk
    fp8 = FLAGS.dispatch_dtype == "fp8"
    S = H // 128 if fp8 else 0
    ddt, cdt = jnp.dtype(DTYPES[FLAGS.dispatch_dtype]), jnp.dtype(DTYPES[FLAGS.combine_dtype])
    runs = []
    for T in tokens:
        rng = np.random.default_rng([FLAGS.seed, T])
        ids_all = np.stack([_routing(rng, T, E, k) for _ in range(R)])
        nbytes = _bytes(ids_all, R, T, H, S)

        def block(r, what):
            g = np.random.default_rng([FLAGS.seed, T, r, what])
            if what == 0:
                return (g.standard_normal((T, H), np.float32) * (8 if fp8 else 1)).astype(ddt)
            if what == 1:
                return g.uniform(0.5, 2.0, (T, S)).astype(np.float32)
            return g.uniform(0.1, 1.0, (T, k)).astype(np.float32)

        inputs = (per_rank.put(mesh, AXIS, lambda r: block(r, 0)),
                  per_rank.put(mesh, AXIS, lambda r: block(r, 1)) if fp8 else None,
                  per_rank.put(mesh, AXIS, lambda r: ids_all[r]),
                  per_rank.put(mesh, AXIS, lambda r: block(r, 2)))
        overlap_n = None
        variants = [(impl, max_sms) for impl in FLAGS.impls
                    for max_sms in (budgets if impl == "ours" else [None])]
        for impl, max_sms in variants:
            entry = {"tokens": T, "impl": impl, "max_sms": max_sms}
            try:
                comm = _make(impl, mesh, T, max_sms)
            except ImportError as e:
                entry.update(available=False, note=f"not available: {e}")
                runs.append(entry)
                continue
            _check_round_trip(comm, mesh, inputs, lambda r: block(r, 0), lambda r: block(r, 2))
            M = comm.max_recv_tokens
            expert_y = per_rank.put(mesh, AXIS, lambda r: np.random.default_rng(
                [FLAGS.seed, T, r, 3]).standard_normal((M, H), np.float32).astype(cdt))
            entry.update(available=True, max_recv_tokens=M,
                         **_measure(comm, mesh, inputs, expert_y, iters, repeats))
            if FLAGS.overlap:
                dispatch_us = entry["loop_us"]["dispatch"]["median"]
                if overlap_n is None:
                    # Sized once per T against the first implementation's dispatch, then shared.
                    overlap_n = _calibrate_matmul(mesh, inputs, dispatch_us, iters, repeats)
                entry["overlap"] = _overlap(comm, mesh, inputs, iters, repeats, overlap_n,
                                            dispatch_us)
            times = comm.fabric_times() if impl == "ours" else None
            if times and times[0]["dispatch"]["steps"]:
                entry["fabric_us_per_step"] = {
                    phase: {key[:-len("_ns")]: ns / 1e3 / t["steps"]
                            for key, ns in t.items() if key.endswith("_ns")}
                    for phase, t in times[0].items() if t["steps"]}
            comm.close()
            entry["bytes"] = {"dispatch": nbytes["dispatch"], "combine": nbytes["combine"]}
            if impl in ("ragged", "padded"):
                entry["wire_bytes"] = nbytes[f"{impl}_wire"]
            runs.append(entry)
            if rank == 0:
                lu = entry["loop_us"]
                print(f"T={T} {_label(entry)}: dispatch {lu['dispatch']['median']:.1f} us, "
                      f"combine {lu['combine']['median']:.1f} us", file=sys.stderr, flush=True)
    if rank == 0:
        print("BENCH_JSON " + json.dumps({"meta": _meta(R, world, iters=iters, repeats=repeats),
                                          "runs": runs}))


def _meta(ranks, world, **counts):
    import jax

    cpu = jax.devices()[0].platform == "cpu"
    return {"ranks": ranks, "processes": world, "platform": jax.devices()[0].platform,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "hidden": FLAGS.hidden, "experts": FLAGS.experts, "topk": FLAGS.topk,
            "dispatch_dtype": FLAGS.dispatch_dtype, "combine_dtype": FLAGS.combine_dtype,
            "transport": FLAGS.transport, "ranks_per_node": FLAGS.ranks_per_node,
            **counts, "unroll": FLAGS.unroll,
            "ragged_exchange": "padded all_to_all (XLA:CPU has no ragged-all-to-all)"
            if cpu else f"jax.lax.ragged_all_to_all ({os.environ.get('XLA_FLAGS', '')})"}


# ---- report --------------------------------------------------------------------------------

def _fmt(s):
    return f"{s['median']:.1f} / {s['p99']:.1f}"


def _header(meta):
    """The lines every report starts with: when, where, how, which shapes."""
    load = meta.get("load_average")
    return [f"- date: {meta['date']}", f"- machine: {meta['machine']}",
            f"- command: `{meta['command']}`",
            *([f"- load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}"]
              if load else []),
            f"- shapes: hidden {meta['hidden']}, {meta['experts']} experts, top-{meta['topk']}, "
            f"dispatch {meta['dispatch_dtype']}, combine {meta['combine_dtype']}; "
            f"jax {meta['jax']}",
            f"- ours: transport {meta.get('transport', 'auto')}, ranks per node "
            f"{meta.get('ranks_per_node') or 'from the hosts'}"]


def write_report(results, stem, plot):
    meta, ceiling = results["meta"], results["ceiling"]
    lines = [f"# all-to-all benchmark: {meta['platform']}, {meta['ranks']} ranks", "",
             *_header(meta),
             f"- loops of {meta['iters']} steps inside one jit"
             f"{' (unrolled: no while loop)' if meta.get('unroll') else ' (a while loop)'}, "
             f"{meta['repeats']} repeats; "
             f"stock `ragged` exchange: {meta['ragged_exchange']}",
             f"- ceiling: {ceiling['kind']} {ceiling['GBps']:.1f} GB/s one way"
             + (f" (memcpy {ceiling['memcpy_GBps']:.1f} GB/s)" if ceiling.get("memcpy_GBps") else ""),
             *(f"- note: {n}" for n in meta.get("notes", [])),
             "", "Latency in µs per step, median / p99. Bytes: what must cross ranks per rank "
             "(tokens once per remote rank); GB/s and % of ceiling from those bytes.", "",
             "| T | impl | dispatch | combine | round trip | loop alone | dispatch send | "
             "dispatch recv | combine send | combine recv | dispatch MB | GB/s (% ceiling) | "
             "combine GB/s (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if not r.get("available"):
            lines.append(f"| {r['tokens']} | {_label(r)} | {r.get('note', '')} ||||||||||")
            continue
        lu, pc, b = r["loop_us"], r["per_call_us"], r["bytes"]
        bw = lambda phase: b[phase] / lu[phase]["median"] / 1e3 if lu[phase]["median"] > 0 else None

        def rate(phase):
            if bw(phase) is None:
                return "n/a"
            pct = f" ({100 * bw(phase) / ceiling['GBps']:.2g}%)" if ceiling["GBps"] else ""
            return f"{bw(phase):.3g}{pct}"
        lines.append(
            f"| {r['tokens']} | {_label(r)} | {_fmt(lu['dispatch'])} | {_fmt(lu['combine'])} | "
            f"{_fmt(lu['round_trip'])} | {_fmt(lu['empty']) if 'empty' in lu else '–'} | "
            f"{_fmt(pc['dispatch_send'])} | {_fmt(pc['dispatch_recv'])} | "
            f"{_fmt(pc['combine_send'])} | {_fmt(pc['combine_recv'])} | {b['dispatch'] / 1e6:.2f} | "
            f"{rate('dispatch')} | {rate('combine')} |")
    lines += ["", "Send/recv halves are single jitted calls (launch and host sync included); "
              "dispatch, combine and round trip are per step of a fused loop; loop alone is a "
              "step of the same loop with nothing in it but its carry.", "",
              "Overlap: dispatch_send, an n×n bf16 matmul, dispatch_recv, per step (µs).", "",
              "| T | impl | n | matmul | dispatch | serial sum | overlapped | hidden |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        o = r.get("overlap")
        if not o:
            continue
        variants = [(_label(r), o)]
        if "second_stream" in o:
            s2 = o["second_stream"]
            variants.append((f"{_label(r)}, matmul on stream {s2['stream']}", s2))
        for label, x in variants:
            result = (f"{x['overlapped_us']:.1f} | {100 * x['hidden_fraction']:.0f}% |"
                      if "error" not in x else f"{x['error']} ||")
            lines.append(f"| {r['tokens']} | {label} | {o['matmul_n']} | {o['matmul_us']:.1f} | "
                         f"{o['dispatch_us']:.1f} | {o['serial_us']:.1f} | {result}")
    traced = []
    for r in results["runs"]:
        o = r.get("overlap") or {}
        loops = [*(r.get("device_us_per_step") or {}).items(),
                 ("overlap", o.get("device_us_per_step")),
                 ("overlap, matmul on a second stream",
                  (o.get("second_stream") or {}).get("device_us_per_step"))]
        traced += [(r, loop, t) for loop, t in loops if t]
    if traced:
        lines += ["", "Device time per step of one traced loop (jax.profiler): busy is the sum "
                  "of every kernel and copy, span from the first one's start to the last one's "
                  "end (busy above span: kernels ran at the same time); then each kernel or copy "
                  "(count per step, µs per step).", "",
                  "| T | impl | loop | busy | span | kernels |", "|---|---|---|---|---|---|"]
        for r, loop, t in traced:
            ks = "; ".join(f"{k['name'][:60]} ×{k['count_per_step']:.3g} "
                           f"{k['us_per_step']:.1f}" for k in t["kernels"][:6])
            lines.append(f"| {r['tokens']} | {_label(r)} | {loop} | "
                         f"{t['busy_us_per_step']:.1f} | {t['span_us_per_step']:.1f} | "
                         f"{ks or 'no GPU trace'} |")
    fabric = [r for r in results["runs"] if r.get("fabric_us_per_step")]
    if fabric:
        lines += ["", "Fabric steps on the first rank's proxy thread, µs per step (mean): "
                  "submitting the writes; from then until every fabric peer's data arrived; "
                  "from this rank's credit until every peer's arrived.", "",
                  "| T | phase | post | data wait | credit wait |", "|---|---|---|---|---|"]
        for r in fabric:
            for phase, t in r["fabric_us_per_step"].items():
                lines.append(f"| {r['tokens']} | {phase} | {t['post']:.2f} | "
                             f"{t['data_wait']:.2f} | {t['credit_wait']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if plot:
        _plot(results, stem + ".png")


def write_training_report(results, stem):
    meta = results["meta"]
    lines = [f"# MoE layer forward and backward: {meta['platform']}, {meta['ranks']} ranks", "",
             *_header(meta),
             f"- one layer: router, float8 quantisation, dispatch, experts (a learned factor per "
             f"expert, not SwiGLU: XLA:CPU computes ragged_dot densely over every local "
             f"expert), combine, a loss; one jitted call per step, {meta['repeats']} "
             f"repeats; stock exchange: {meta['ragged_exchange']}",
             *(f"- note: {n}" for n in meta.get("notes", [])),
             "", "ms per step, median / p99. Gradient error: max |ours - stock| / max |stock| "
             "of the gradients of x, the router and the experts (equal: bit for bit), checked "
             "before timing.", "",
             "| T | impl | forward | forward+backward | backward (difference) | gradient error |",
             "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        fwd, both = r["forward_ms"], r["forward_backward_ms"]
        errors = next((v for k, v in r.items() if k.startswith("grad_rel_error")), None)
        err = (", ".join(f"{k} {v:.2g}" if v else f"{k} equal" for k, v in errors.items())
               if errors else "(oracle)")
        lines.append(f"| {r['tokens']} | {r['impl']} | {fwd['median']:.1f} / {fwd['p99']:.1f} | "
                     f"{both['median']:.1f} / {both['p99']:.1f} | "
                     f"{both['median'] - fwd['median']:.1f} | {err} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, phase in zip(axes, ("dispatch", "combine")):
        for impl in dict.fromkeys(_label(r) for r in results["runs"]):
            pts = sorted((r["tokens"], r["loop_us"][phase]["median"]) for r in results["runs"]
                         if _label(r) == impl and r.get("available"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="tokens per rank", title=phase)
        ticks = sorted({r["tokens"] for r in results["runs"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("µs per step (median)")
    axes[0].legend()
    m = results["meta"]
    fig.suptitle(f"{m['platform']} x{m['ranks']}: hidden {m['hidden']}, {m['experts']} experts, "
                 f"top-{m['topk']}, {m['dispatch_dtype']} dispatch, {m['combine_dtype']} combine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def main(argv):
    if FLAGS.replot:
        with open(FLAGS.replot) as f:
            results = json.load(f)
        stem = FLAGS.replot[:-len(".json")]
        if "forward_ms" in results["runs"][0]:
            write_training_report(results, stem)
        else:
            write_report(results, stem, True)
        return 0
    from jax_efa_moe import launch

    _budgets()
    gpus = _gpu_count()
    plat = FLAGS.platform if FLAGS.platform != "auto" else ("cuda" if gpus else "cpu")
    n = FLAGS.processes or (1 if plat == "cuda" else 2)
    if plat == "cuda" and gpus < n:
        # Processes sharing a GPU time-slice it: their timings would mean nothing.
        raise app.UsageError(f"--platform=cuda times one process per GPU: {n} processes, "
                             f"{gpus} GPUs")
    if FLAGS.training:
        ceiling = None
    elif plat == "cuda" and gpus < 2:
        # One rank: nothing crosses ranks, the step's fixed cost is what is timed.
        ceiling = {"kind": "none (one GPU, no peer)", "GBps": 0.0}
    elif plat == "cuda":
        gbps = peer_copy_gbps()
        ceiling = {"kind": "1 GiB peer copy GPU0->GPU1", "GBps": gbps or 0.0}
    else:
        ceiling = {"kind": "loopback TCP (127.0.0.1, two threads)", "GBps": loopback_tcp_gbps(),
                   "memcpy_GBps": memcpy_gbps()}
    if ceiling is not None:
        print(f"ceiling: {ceiling}", flush=True)
    env = {"PYTHONPATH": os.pathsep.join([HERE, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    if plat == "cpu":
        # The ranks share the host's cores: one compute thread each keeps them from fighting.
        env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    elif n > 1:
        # With one process per GPU, XLA treats ragged_all_to_all as multi-host and refuses it
        # unless told to run it as NCCL send/recv.
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + RAGGED_MULTIPROCESS_FLAG).strip()
    load_at_start = os.getloadavg()[0]
    try:
        outputs = launch.run("bench_all_to_all:worker", num_processes=n, args=sys.argv[1:],
                             timeout_s=FLAGS.timeout_s, env=env, platform=plat)
    except launch.LaunchError as e:
        print(e, file=sys.stderr)
        return 1
    line = next(l for l in outputs[0].splitlines() if l.startswith("BENCH_JSON "))
    results = json.loads(line[len("BENCH_JSON "):])
    if ceiling is not None:
        results["ceiling"] = ceiling
    results["meta"].update(
        load_average=[load_at_start, os.getloadavg()[0]],
        notes=results["meta"].get("notes", []) + FLAGS.note,
        date=bench_report.now(), command=bench_report.command(),
        machine=bench_report.machine_text(
            f"{gpus} x {results['meta']['device']}" if plat == "cuda" else ""))
    os.makedirs(FLAGS.out, exist_ok=True)
    stem = os.path.join(FLAGS.out,
                        FLAGS.name or f"{'training' if FLAGS.training else 'a2a'}_{plat}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    if FLAGS.training:
        write_training_report(results, stem)
    else:
        write_report(results, stem, FLAGS.plot)
    print(open(stem + ".md").read())
    return 0


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    app.run(main)
