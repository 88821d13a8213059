"""TransferEngine bandwidth, latency and immediates per second, next to libfabric's fi_pingpong.

Two processes on this machine, for each provider present (tcp;ofi_rxm, shm) and each size:

- engine stream: rank 0 posts back-to-back writes with immediates, rank 1 counts them and
  answers with one zero-length write; one-way bandwidth = bytes / time (median and p99 over
  repeats);
- engine ping-pong: a write of `size` each way in turn, like fi_pingpong: half a round trip
  per transfer (median, p99 over iterations) and size / that;
- fi_pingpong (libfabric-bin) with the same provider, sizes and iterations, server and client
  on 127.0.0.1 (median, p99 over repeats of its reported usec/xfer and MB/sec);
- immediates per second: zero-length writes, in scatters of 1 and of 64 writes.

    python benchmarks/bench_transfer.py [--providers=tcp;ofi_rxm,shm] [--max_size=67108864]

Writes benchmarks/results/<name>.json and <name>.md (date, machine, command, table).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import time

import numpy as np
from absl import app, flags

from bench_report import command, machine, now, percentile, write
from jax_efa_moe import _jem, bootstrap, launch

FLAGS = flags.FLAGS
flags.DEFINE_list("providers", ["tcp;ofi_rxm", "shm"],
                  "libfabric providers to measure (those not present are skipped).")
flags.DEFINE_integer("min_size", 4096, "Smallest write, bytes.")
flags.DEFINE_integer("max_size", 64 << 20, "Largest write, bytes.")
flags.DEFINE_integer("size_factor", 4, "Each size is this times the previous one.")
flags.DEFINE_integer("bytes_per_point", 256 << 20,
                     "Bytes moved per measurement; sets iterations (clamped to [min, max]).")
flags.DEFINE_integer("min_iters", 10, "Fewest iterations per measurement.")
flags.DEFINE_integer("max_iters", 1000, "Most iterations per measurement.")
flags.DEFINE_integer("repeats", 5, "Repeats of each stream and fi_pingpong measurement.")
flags.DEFINE_integer("imm_writes", 20000, "Zero-length writes per immediates-per-second run.")
flags.DEFINE_bool("busy_poll", False, "Engine proxies spin without yielding or sleeping.")
flags.DEFINE_bool("pingpong", True, "Also run fi_pingpong.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the JSON and markdown go.")
flags.DEFINE_string("name", "transfer_cpu", "Base name of the result files.")

TIMEOUT_S = 120.0
MiB = 1 << 20


def sizes(min_size, max_size, factor):
    out, s = [], min_size
    while s <= max_size:
        out.append(s)
        s *= factor
    return out


def iterations(size, bytes_per_point, lo, hi):
    return int(min(hi, max(lo, bytes_per_point // size)))


# --- the engine side: two ranks, launched by launch.run --------------------------------------


def worker(rank, world, args):
    """Rank 0 drives and times; rank 1 mirrors. Prints one RESULT line on rank 0.

    For each size, the warm-up's bytes are checked on both ranks; then repeats alternate an engine stream, an engine ping-pong and (on rank 0)
    one fi_pingpong run, so that both see the same machine load; during fi_pingpong both
    ranks wait in the key-value store, leaving their engines idle.
    """
    cfg = json.loads(args[0])
    engine = _jem.Engine(provider=cfg["provider"], busy_poll=cfg["busy_poll"])
    largest = max(cfg["sizes"])
    src = np.random.default_rng(rank).integers(0, 256, largest, dtype=np.uint8)
    dst = np.zeros(largest, np.uint8)
    src_region, dst_region = engine.register(src), engine.register(dst)
    addresses = bootstrap.all_gather_bytes("bench_addr", engine.address(), rank, world)
    descriptors = bootstrap.all_gather_bytes("bench_desc", dst_region.descriptor(), rank, world)
    peer = 1 - rank
    peer_src = np.random.default_rng(peer).integers(0, 256, largest, dtype=np.uint8)
    group = engine.add_peer_group(src_region, [(addresses[peer], descriptors[peer])])
    wait = lambda imm, n=1: engine.wait_imm(imm, n, TIMEOUT_S)  # noqa: E731
    sync = lambda: bootstrap.all_gather_bytes("bench_sync", b"", rank, world)  # noqa: E731
    results = []
    for size in cfg["sizes"]:
        iters = iterations(size, cfg["bytes_per_point"], cfg["min_iters"], cfg["max_iters"])
        one = np.array([[0, 0, 0, size]], np.int64)
        stream, half_rtt, pingpong = [], [], []
        for repeat in range(cfg["repeats"] + 1):  # repeat 0 warms up and is dropped
            # Stream: `iters` writes in flight at once, then one zero-length answer.
            sync()
            if rank == 0:
                t0 = time.perf_counter()
                for _ in range(iters):
                    engine.scatter(group, one, 3)
                wait(4)
                elapsed = time.perf_counter() - t0
            else:
                wait(3, iters)
                engine.barrier(group, 4)
            # Ping-pong: one write each way per iteration, timed per iteration on rank 0.
            sync()
            times = []
            for _ in range(iters):
                if rank == 0:
                    t0 = time.perf_counter()
                    engine.scatter(group, one, 1)
                    wait(2)
                    times.append((time.perf_counter() - t0) / 2)
                else:
                    wait(1)
                    engine.scatter(group, one, 2)
            sync()
            if repeat == 0 and not np.array_equal(dst[:size], peer_src[:size]):
                raise AssertionError(f"rank {rank}: the {size} bytes from rank {peer} arrived "
                                     "wrong in the warm-up; nothing timed")
            if rank == 0 and cfg["pingpong"]:
                result = fi_pingpong_once(cfg["provider"], size, iters)
            if rank == 0 and repeat > 0:
                stream.append(elapsed)
                half_rtt += times
                if cfg["pingpong"]:
                    pingpong.append(result)
        if rank == 0:
            point = {"size": size, "iters": iters, "repeats": cfg["repeats"],
                     "stream_MBps_median": iters * size / statistics.median(stream) / 1e6,
                     "stream_MBps_p99": iters * size / percentile(stream, 99) / 1e6,
                     "pingpong_us_median": statistics.median(half_rtt) * 1e6,
                     "pingpong_us_p99": percentile(half_rtt, 99) * 1e6,
                     "pingpong_MBps": size / statistics.median(half_rtt) / 1e6}
            if pingpong:
                us, mbps = [r[0] for r in pingpong], [r[1] for r in pingpong]
                point["fi_pingpong"] = {
                    "us_median": statistics.median(us), "us_p99": percentile(us, 99),
                    "MBps_median": statistics.median(mbps), "MBps_p99": percentile(mbps, 1)}
            results.append(point)

    # Immediates per second: zero-length writes, one per scatter and 64 per scatter.
    imm_rates = {}
    n = cfg["imm_writes"]
    for batch in (1, 64):
        writes = np.zeros((batch, 4), np.int64)
        sync()
        if rank == 0:
            t0 = time.perf_counter()
            for _ in range(n // batch):
                engine.scatter(group, writes, 5)
            wait(6)
            imm_rates[f"per_scatter_{batch}"] = (n // batch) * batch / (time.perf_counter() - t0)
        else:
            wait(5, (n // batch) * batch)
            engine.barrier(group, 6)
    # Both sides are done before either closes.
    sync()
    engine.close()
    if rank == 0:
        print("RESULT " + json.dumps({"points": results, "imm_per_s": imm_rates}), flush=True)
        time.sleep(0.5)  # rank 0 hosts jax.distributed's service: let rank 1 leave first


def run(provider, size_list, pingpong):
    cfg = {"provider": provider, "sizes": size_list, "busy_poll": FLAGS.busy_poll,
           "bytes_per_point": FLAGS.bytes_per_point, "min_iters": FLAGS.min_iters,
           "max_iters": FLAGS.max_iters, "repeats": FLAGS.repeats, "imm_writes": FLAGS.imm_writes,
           "pingpong": pingpong}
    here = os.path.dirname(os.path.abspath(__file__))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    outputs = launch.run("bench_transfer:worker", 2, [json.dumps(cfg)], timeout_s=3600, env=env)
    line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# --- fi_pingpong -------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PINGPONG_LINE = re.compile(r"^\s*(\S+)\s+(\S+)\s+=?(\S+)\s+(\S+)\s+([\d.]+)s\s+([\d.]+)\s+([\d.]+)")


def fi_pingpong_once(provider, size, iters):
    """One server+client run; returns (usec_per_xfer, MB_per_s) from the client's report."""
    common = ["fi_pingpong", "-p", provider, "-e", "rdm", "-I", str(iters), "-S", str(size)]
    env = dict(os.environ, FI_TCP_IFACE=os.environ.get("FI_TCP_IFACE", "lo"))
    for attempt in range(3):
        port = free_port()
        server = subprocess.Popen(common + ["-B", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5 * (attempt + 1))  # the server opens its control port
            client = subprocess.run(common + ["-P", str(port), "127.0.0.1"], env=env,
                                    capture_output=True, text=True, timeout=600)
        finally:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for line in client.stdout.splitlines():
            m = PINGPONG_LINE.match(line)
            if m and m.group(1) != "bytes":
                return float(m.group(7)), float(m.group(6))
    raise RuntimeError(f"fi_pingpong -p {provider} -S {size} printed no result:\n"
                       f"{client.stdout}\n{client.stderr}")


# --- report ------------------------------------------------------------------------------


def human(size):
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def markdown(report):
    lines = [
        "# TransferEngine vs fi_pingpong",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']['nproc']} cores, {report['machine']['cpu_model']}, "
        f"kernel {report['machine']['kernel']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_avg_at_start'])}",
        f"- command: `{report['command']}`",
        f"- engine busy_poll: {report['busy_poll']}",
        "",
        "Stream: back-to-back writes, one-way MB/s, median (p99: the slowest repeat). "
        "Ping-pong: one write each way in turn, half a round trip per transfer as fi_pingpong "
        "measures it, median (p99) over all iterations. fi_pingpong: its usec/xfer and MB/sec, "
        "median (p99) over repeats. Engine and fi_pingpong runs alternate within each size, "
        "so both see the same machine load.",
        "",
        "| provider | size | engine stream MB/s | engine ping-pong µs | engine ping-pong MB/s "
        "| fi_pingpong µs | fi_pingpong MB/s | stream / fi_pingpong |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for prov in report["providers"]:
        for p in prov["points"]:
            pp = p.get("fi_pingpong")
            ratio = f"{p['stream_MBps_median'] / pp['MBps_median']:.2f}×" if pp else "—"
            pp_us = f"{pp['us_median']:.1f} ({pp['us_p99']:.1f})" if pp else "—"
            pp_bw = f"{pp['MBps_median']:.0f}" if pp else "—"
            lines.append(
                f"| {prov['provider']} | {human(p['size'])} | {p['stream_MBps_median']:.0f} "
                f"({p['stream_MBps_p99']:.0f}) | {p['pingpong_us_median']:.1f} "
                f"({p['pingpong_us_p99']:.1f}) | {p['pingpong_MBps']:.0f} | {pp_us} | {pp_bw} "
                f"| {ratio} |")
    lines += ["", "Immediates per second (zero-length writes):", "",
              "| provider | 1 write per scatter | 64 writes per scatter |", "|---|---|---|"]
    for prov in report["providers"]:
        r = prov["imm_per_s"]
        lines.append(f"| {prov['provider']} | {r['per_scatter_1']:,.0f} "
                     f"| {r['per_scatter_64']:,.0f} |")
    for prov in report["skipped"]:
        lines.append(f"\nSkipped {prov['provider']}: {prov['reason']}")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    size_list = sizes(FLAGS.min_size, FLAGS.max_size, FLAGS.size_factor)
    available = _jem.providers()
    have_pingpong = FLAGS.pingpong and shutil.which("fi_pingpong") is not None
    report = {"date": now(), "machine": machine(), "command": command(),
              "busy_poll": FLAGS.busy_poll, "providers": [], "skipped": []}
    for provider in FLAGS.providers:
        if provider not in available:
            report["skipped"].append({"provider": provider,
                                      "reason": f"not offered here (available: {available})"})
            continue
        print(f"{provider} ...", flush=True)
        report["providers"].append({"provider": provider, **run(provider, size_list, have_pingpong)})
    write(FLAGS.out_dir, FLAGS.name, report, markdown(report))


if __name__ == "__main__":
    app.run(main)
