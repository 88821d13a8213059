"""The NVLink kernels alone, without XLA: `nvlink_context_test --bench`, recorded.

The test binary times the four kernels with CUDA events (cc/a2a/nvlink_context_test.cc), each
configuration's first step checked bit for bit against its host reference before anything is
timed; the binary fails, and nothing is written, if a check does. This script runs it and
writes <out_dir>/<name>.json and <name>.md with the date, the machine and the command.

    python benchmarks/bench_kernels.py [--binary=build/gpu/nvlink_context_test] [--world=1]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from bench_report import command, machine, machine_text, now, write

FLAGS = flags.FLAGS
flags.DEFINE_string("binary", "build/gpu/nvlink_context_test", "The kernel test binary.")
flags.DEFINE_integer("world", 0, "Ranks, one GPU each, in one process (0: 2 where there are "
                     "2 GPUs, else 1).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where the report goes.")
flags.DEFINE_string("name", None, "File name stem; default nvlink_kernels_ep<world>.")


def _gpus() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _table(report) -> str:
    m = report["meta"]
    lines = [f"# NVLink kernels alone: {m['world']} rank(s), one GPU each", "",
             f"- date: {m['date']}", f"- machine: {m['machine_text']}",
             f"- command: `{m['command']}`",
             "- what is timed: the four kernels without XLA, CUDA events between them, each GPU "
             "held until a batch of 25 steps is queued; fp8 dispatch with scales, bf16 "
             "combine, 256 experts, top-8; a recv includes waiting for its peers' send; "
             "\"whole\": the whole ops, one kernel each, as XLA's dispatch and combine run",
             f"- an empty kernel between two events: {report['empty_kernel_us']['1x512']:.1f} "
             f"µs (1x512), {report['empty_kernel_us']['264x512']:.1f} µs (264x512)"]
    if report["peer_copy_1GiB_GBps"] > 0:
        lines.append(f"- 1 GiB peer copy GPU0->GPU1: {report['peer_copy_1GiB_GBps']:.1f} GB/s")
    lines += ["", "µs, median (p99):", "",
              "| case | dispatch | send | recv | combine | send | recv |",
              "|---|---|---|---|---|---|---|"]
    graphed = [r for r in report["runs"] if r.get("graph")]
    for r in report["runs"]:
        if r.get("graph"):
            continue
        # A whole op is one kernel, without halves to time.
        med = lambda k: f"{r[k]['median']:.1f}" if k in r else "–"
        lines.append(
            f"| {r['name']} | {med('dispatch_us')} ({r['dispatch_us']['p99']:.1f}) | "
            f"{med('dispatch_send_us')} | {med('dispatch_recv_us')} | "
            f"{med('combine_us')} ({r['combine_us']['p99']:.1f}) | "
            f"{med('combine_send_us')} | {med('combine_recv_us')} |")
    if graphed:
        lines += ["", "Replayed from CUDA graphs of 25 steps, as XLA's command buffers replay "
                  "them, with no event between the kernels: µs per step (dispatch and "
                  "combine), median (p99):", "", "| case | step |", "|---|---|"]
        lines += [f"| {r['name']} | {r['step_us']['median']:.1f} ({r['step_us']['p99']:.1f}) |"
                  for r in graphed]
    for run in report.get("phases", []):
        lines += ["", f"Where a step's time goes, {run['name']}: steps one at a time, every block "
                  "stamping %globaltimer as each phase ends; µs from the op's start when the "
                  f"first and the last block got there, median of {run['steps']} steps:", "",
                  "| op | phase | first block | last block |", "|---|---|---|---|"]
        lines += [f"| {p['op']} | {p['phase']} | {p['first_us']:.2f} | {p['last_us']:.2f} |"
                  for p in run["phases"]]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    gpus = _gpus()
    world = FLAGS.world or min(len(gpus), 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        run = subprocess.run([FLAGS.binary, "--world", str(world), "--bench", path],
                             capture_output=True, text=True)
        print(run.stdout, run.stderr, sep="", end="")
        if run.returncode != 0:
            print(f"{FLAGS.binary} failed (exit code {run.returncode}): nothing recorded",
                  file=sys.stderr)
            return 1
        with open(path) as f:
            report = json.load(f)
    report["meta"] = {"date": now(), "machine": machine(), "gpus": gpus, "world": world,
                      "machine_text": machine_text(f"{len(gpus)} x {gpus[0]}"),
                      "command": command()}
    write(FLAGS.out_dir, FLAGS.name or f"nvlink_kernels_ep{world}", report, _table(report))
    return 0


if __name__ == "__main__":
    app.run(main)
