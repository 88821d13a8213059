"""What the NVLink kernels' building blocks cost on this GPU (benchmarks/sync_primitives_bench.cu).

Full-grid launches back to back in a CUDA graph, a grid-wide handoff by block ticket (as the
whole-op kernels hand their send half to their recv half) and by per-block arrival counts,
dependent loads from L2 and HBM, a system-scope release, and HBM bandwidth: a copy (the send
half's pack at one rank), sequential stores, the recv half's expansion (one load, k stores)
and the same expansion turned around (blocks own output rows and gather their records). The program
checks every result before it times it. These are the floors that the kernels' figures in
nvlink_kernels_*.md are made of.

    python benchmarks/bench_primitives.py [--binary=build/gpu/sync_primitives_bench]
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
flags.DEFINE_string("binary", "build/gpu/sync_primitives_bench", "the built benchmark program")
flags.DEFINE_integer("launches", 200, "back-to-back launches per timed batch")
flags.DEFINE_integer("repeats", 7, "batches; the median is reported")
flags.DEFINE_float("peak_tb_s", 4.8, "the GPU's HBM bandwidth, for the fraction of the link")
flags.DEFINE_string("out", "benchmarks/results", "where primitives_gpu.json/.md go")


def main(_):
    done = subprocess.run([FLAGS.binary, f"--launches={FLAGS.launches}",
                           f"--repeats={FLAGS.repeats}"], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{FLAGS.binary} failed ({done.returncode}): {done.stderr}{done.stdout}")
    r = json.loads(done.stdout)
    report = {"date": bench_report.now(), "machine": bench_report.machine(),
              "command": bench_report.command(), "peak_tb_s": FLAGS.peak_tb_s, **r}
    empty = r["empty_kernel_us"]
    launch_rows = [
        ("empty kernel", r["empty_kernel_us"]),
        ("block ticket (LastBlock)", r["ticket_kernel_us"]),
        ("handoff: ticket, the last block's release.sys flag, acquire.sys polls (now)",
         r["ticket_handoff_acquire_polls_us"]),
        ("handoff: ticket, release.sys flag, relaxed polls, one acquire fence",
         r["ticket_handoff_relaxed_polls_us"]),
        ("handoff: per-block red.release.sys arrival count, acquire.sys polls",
         r["arrival_handoff_acquire_polls_us"]),
        ("handoff: per-block red.release.sys arrival count, relaxed polls, one fence",
         r["arrival_handoff_relaxed_polls_us"]),
        ("handoff: per-block arrival count at GPU scope, relaxed polls, one fence",
         r["arrival_handoff_gpu_us"]),
    ]
    bw_rows = [
        ("copy (read + write)", r["copy_bytes"], r["copy_us"], r["copy_tb_s"]),
        ("sequential stores", r["fill_bytes"], r["fill_us"], r["fill_tb_s"]),
        ("expansion, k=8: each record loaded once, stored to its rows (writes)",
         r["expand_write_bytes"], r["expand_us"], r["expand_write_tb_s"]),
        ("expansion, stores marked evict-first in L2 (writes)", r["expand_write_bytes"],
         r["expand_evict_first_us"], r["expand_evict_first_write_tb_s"]),
        ("expansion turned around: blocks own output rows, gather records (writes)",
         r["expand_write_bytes"], r["gather_us"], r["gather_write_tb_s"]),
    ]
    table = (
        f"# Building blocks of the NVLink kernels\n\n- date: {report['date']}\n"
        f"- machine: {bench_report.machine_text(r['gpu'])}\n"
        f"- command: `{report['command']}`\n"
        f"- grid: {r['grid']} blocks of {r['threads']} threads (2 per SM), "
        f"one CUDA graph of {r['launches']} launches, median of {r['repeats']} replays\n\n"
        "| kernel | µs per launch | over the empty kernel |\n|---|---|---|\n"
        + "\n".join(f"| {name} | {us:.2f} | {us - empty:+.2f} |" for name, us in launch_rows)
        + f"\n\nOne thread: a dependent load {r['l2_load_ns']:.0f} ns from L2, "
        f"{r['hbm_load_ns']:.0f} ns from HBM; a st.release.sys {r['release_sys_ns']:.0f} ns.\n\n"
        "| bandwidth | bytes | µs | TB/s | of peak |\n|---|---|---|---|---|\n"
        + "\n".join(f"| {name} | {b / 1e6:.1f} MB | {us:.1f} | {tb:.2f} | "
                    f"{tb / FLAGS.peak_tb_s:.0%} |" for name, b, us, tb in bw_rows) + "\n")
    bench_report.write(FLAGS.out, "primitives_gpu", report, table)


if __name__ == "__main__":
    app.run(main)
