"""CPU cost of posting one dispatch step's writes, for 1 to 63 peers (the engine alone).

One sender and N receivers, each its own process, over one provider (shm by default). A
step is what dispatch posts: a scatter of one route row to every peer, then a scatter of one
records chunk to every peer (and, with --overflow_bytes, a third of overflow records), each
scatter with its own immediate. Per step the sender measures

- post: the wall time of the Scatter calls, from Python (the CPU time to submit; it includes
  the binding's conversion of the [N, 4] write table, a microsecond or so per call);
- complete: from the first Scatter until every write has completed locally (WaitSent).

Median and p99 over --repeats steps, after --warmup. Before timing, one step is checked:
every receiver compares the bytes that landed with what the sender wrote and counts exactly
one arrival of each immediate; after timing, receivers count every step's arrivals exactly.

    python benchmarks/bench_post.py [--peers=1,2,4,8,16,32,63] [--provider=shm]

Writes benchmarks/results/<name>.json and <name>.md (date, machine, command, table).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import app, flags

from bench_report import command, machine, now, percentile, write
from jax_efa_moe import _jem, bootstrap, launch

FLAGS = flags.FLAGS
flags.DEFINE_list("peers", ["1", "2", "4", "8", "16", "32", "63"], "Receiver counts to measure.")
flags.DEFINE_string("provider", "shm", "libfabric provider.")
flags.DEFINE_integer("route_bytes", 1024, "Bytes of the route row written to each peer.")
flags.DEFINE_integer("records_bytes", 8192, "Bytes of the records chunk written to each peer.")
flags.DEFINE_integer("overflow_bytes", 0, "Bytes of a third, overflow write per peer (0: none).")
flags.DEFINE_integer("repeats", 300, "Timed steps per peer count.")
flags.DEFINE_integer("warmup", 30, "Untimed steps first.")
flags.DEFINE_bool("busy_poll", False, "Engine proxies spin without yielding or sleeping.")
flags.DEFINE_integer("sender_cpu", -1, "Core to pin the sender's proxy thread to (-1: none).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the JSON and markdown go.")
flags.DEFINE_string("name", "post_cpu", "Base name of the result files.")

TIMEOUT_S = 120.0
FIRST_IMM = 40  # scatter k of a step carries immediate FIRST_IMM + k


def write_sizes(cfg):
    return [b for b in (cfg["route_bytes"], cfg["records_bytes"], cfg["overflow_bytes"]) if b]


def sent_bytes(peer, nbytes):
    """What the sender writes to peer (group index) `peer`: its slot of the send buffer."""
    return np.random.default_rng([7, peer]).integers(0, 256, nbytes, dtype=np.uint8)


def worker(rank, world, args):
    """Rank 0 sends and times; ranks 1..N receive and check. Rank 0 prints one RESULT line."""
    cfg = json.loads(args[0])
    peers = world - 1
    sizes = write_sizes(cfg)
    slot = sum(sizes)  # one peer's step: its writes side by side
    engine = _jem.Engine(provider=cfg["provider"], busy_poll=cfg["busy_poll"],
                         pin_cpu=cfg["sender_cpu"] if rank == 0 else -1)
    if rank == 0:
        buffer = np.concatenate([sent_bytes(p, slot) for p in range(peers)])
    else:
        buffer = np.zeros(slot, np.uint8)
    region = engine.register(buffer)
    addresses = bootstrap.all_gather_bytes("post_addr", engine.address(), rank, world)
    descriptors = bootstrap.all_gather_bytes("post_desc", region.descriptor(), rank, world)
    steps = 1 + cfg["warmup"] + cfg["repeats"]

    if rank == 0:
        group = engine.add_peer_group(region, [(addresses[r], descriptors[r])
                                               for r in range(1, world)])
        # Scatter k: the k-th write of every peer's slot, to the same offset on the peer.
        scatters = []
        for k, size in enumerate(sizes):
            offset = sum(sizes[:k])
            table = np.array([[p, p * slot + offset, offset, size] for p in range(peers)],
                             np.int64)
            scatters.append((FIRST_IMM + k, table))

        def step():
            t0 = time.perf_counter()
            tickets = [engine.scatter(group, table, imm) for imm, table in scatters]
            t1 = time.perf_counter()
            for ticket in tickets:
                engine.wait_sent(ticket, TIMEOUT_S)
            return t1 - t0, time.perf_counter() - t0

        step()
        checks = bootstrap.all_gather_bytes("post_check", b"", rank, world)[1:]
        post, complete = [], []
        for i in range(cfg["warmup"] + cfg["repeats"]):
            p, c = step()
            if i >= cfg["warmup"]:
                post.append(p)
                complete.append(c)
        counts = bootstrap.all_gather_bytes("post_counts", b"", rank, world)[1:]
        failures = [m.decode() for m in checks + counts if m]
        if failures:
            raise AssertionError("receivers found wrong results: " + "; ".join(failures))
        us = lambda xs, q: percentile(xs, q) * 1e6  # noqa: E731
        writes = peers * len(sizes)
        result = {"peers": peers, "writes_per_step": writes, "scatters_per_step": len(sizes),
                  "post_us_median": statistics.median(post) * 1e6, "post_us_p99": us(post, 99),
                  "post_us_per_write_median": statistics.median(post) * 1e6 / writes,
                  "complete_us_median": statistics.median(complete) * 1e6,
                  "complete_us_p99": us(complete, 99)}
        bootstrap.all_gather_bytes("post_done", b"", rank, world)
        engine.close()
        print("RESULT " + json.dumps(result), flush=True)
        time.sleep(0.5)  # rank 0 hosts jax.distributed's service: let the others leave first
        return

    # A receiver: the checked step, then every timed step's arrivals, counted exactly.
    want = sent_bytes(rank - 1, slot)

    def check(step_count, what):
        for k in range(len(sizes)):
            engine.wait_imm(FIRST_IMM + k, step_count, TIMEOUT_S)
            if engine.try_consume_imm(FIRST_IMM + k, 1):
                return f"rank {rank}: more than {step_count} arrivals of immediate {FIRST_IMM + k}"
        if not np.array_equal(buffer, want):
            return f"rank {rank}: {what}: byte {int(np.argmax(buffer != want))} differs"
        return ""

    bootstrap.all_gather_bytes("post_check", check(1, "checked step").encode(), rank, world)
    bootstrap.all_gather_bytes("post_counts", check(steps - 1, "after timing").encode(), rank,
                               world)
    bootstrap.all_gather_bytes("post_done", b"", rank, world)
    engine.close()


def config():
    return {"provider": FLAGS.provider, "route_bytes": FLAGS.route_bytes,
            "records_bytes": FLAGS.records_bytes, "overflow_bytes": FLAGS.overflow_bytes,
            "repeats": FLAGS.repeats, "warmup": FLAGS.warmup, "busy_poll": FLAGS.busy_poll,
            "sender_cpu": FLAGS.sender_cpu}


def run(cfg, peers):
    here = os.path.dirname(os.path.abspath(__file__))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    outputs = launch.run("bench_post:worker", peers + 1, [json.dumps(cfg)], timeout_s=1800,
                         env=env)
    line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def markdown(report):
    m = report["machine"]
    sizes = " + ".join(f"{b} B" for b in write_sizes(report["config"]))
    lines = [
        "# Posting one dispatch step's writes: CPU cost",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['host']}, {m['nproc']} cores, {m['cpu_model']}, kernel {m['kernel']}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}",
        f"- command: `{report['command']}`",
        f"- provider {report['config']['provider']}, writes per peer per step: {sizes} "
        f"(one scatter each), {report['config']['repeats']} steps after "
        f"{report['config']['warmup']} warm-up, busy_poll {report['config']['busy_poll']}",
        "",
        "post: wall time of the step's Scatter calls from Python (binding included); complete: "
        "from the first Scatter until WaitSent returned for all. Median (p99) in µs. One "
        "sender and N receivers, each a process, share the machine's cores.",
        "",
        "| peers | writes | post µs | post µs per write | complete µs |",
        "|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(f"| {p['peers']} | {p['writes_per_step']} | {p['post_us_median']:.1f} "
                     f"({p['post_us_p99']:.1f}) | {p['post_us_per_write_median']:.2f} "
                     f"| {p['complete_us_median']:.1f} ({p['complete_us_p99']:.1f}) |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.provider not in _jem.providers():
        raise app.UsageError(f"provider '{FLAGS.provider}' is not offered here: "
                             f"{_jem.providers()}")
    report = {"date": now(), "machine": machine(), "command": command(), "config": config(),
              "points": []}
    for peers in map(int, FLAGS.peers):
        if not 1 <= peers <= 63:
            raise app.UsageError(f"--peers: {peers} is outside 1..63")
        print(f"{peers} peers ...", flush=True)
        report["points"].append(run(report["config"], peers))
    write(FLAGS.out_dir, FLAGS.name, report, markdown(report))


if __name__ == "__main__":
    app.run(main)
