"""GPU -> proxy -> GPU signal latency of the fabric path (benchmarks/proxy_signal_bench.cu).

A GPU thread publishes a step number in mapped host memory; a poll hook on a TransferEngine's
proxy thread answers it in mapped host memory, as FabricProxy does for the send kernels'
mailbox and the receive kernels' flags. Reported: round trip p50/p99 and half of it (one
way), beside a plain CPU thread answering the same way (the floor). Every step must be
answered with its own number, or the run fails before anything is written.

    python benchmarks/bench_signal.py [--binary=build/gpu/proxy_signal_bench]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("binary", "build/gpu/proxy_signal_bench", "the built benchmark program")
flags.DEFINE_list("providers", ["shm", "tcp;ofi_rxm"], "libfabric providers of the engine")
flags.DEFINE_integer("iters", 20000, "round trips per run")
flags.DEFINE_string("out", "benchmarks/results", "where signal_gpu.json/.md go")


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU"


def main(_):
    runs = []
    for provider in FLAGS.providers:
        done = subprocess.run([FLAGS.binary, f"--provider={provider}", f"--iters={FLAGS.iters}"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"{FLAGS.binary} failed ({done.returncode}): {done.stderr}"
                             f"{done.stdout}")
        runs.append(json.loads(done.stdout))
    report = {"date": bench_report.now(), "machine": {**bench_report.machine(), "gpu": gpu_name()},
              "command": bench_report.command(), "runs": runs}
    rows = "\n".join(
        f"| {r['provider']} | {r['proxy_rtt_p50_us']:.2f} / {r['proxy_rtt_p99_us']:.2f} | "
        f"{r['proxy_rtt_p50_us'] / 2:.2f} | {r['bare_rtt_p50_us']:.2f} / "
        f"{r['bare_rtt_p99_us']:.2f} |" for r in runs)
    table = (f"# GPU <-> proxy signal latency\n\n{report['date']}, {report['machine']['gpu']}, "
             f"{report['machine']['cpu_model']}; `{report['command']}`\n\n"
             "| engine provider | proxy hook round trip p50 / p99 µs | one way (half) p50 µs | "
             "plain CPU thread round trip p50 / p99 µs |\n|---|---|---|---|\n" + rows + "\n")
    bench_report.write(FLAGS.out, "signal_gpu", report, table)


if __name__ == "__main__":
    app.run(main)
