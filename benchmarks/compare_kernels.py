"""Kernel A/B on one GPU: the `nvlink_context_test --bench` results of several source trees,
timed in turns (`scripts/gpu_check.sh ab`, after `scripts/kernel_ab.sh`), side by side.

Each variant ran every benchmark once per round; a figure here is the median over rounds of
that round's median, beside its spread over rounds (max - min), which says how much of a
difference is noise. Every run was checked against its host reference before it was timed
(the test binary fails otherwise, and there is then nothing to compare).

    python benchmarks/compare_kernels.py --revisions=.ab/REVISIONS --out=DIR ab_*_round*.json
"""

from __future__ import annotations

import collections
import json
import os
import re
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("revisions", None, "scripts/kernel_ab.sh's list: variant name, revision")
flags.DEFINE_string("out", "benchmarks/results", "where kernels_ab.json/.md go")
flags.DEFINE_string("name", "kernels_ab", "file name stem")


def _figures(report):
    """{(case, metric): µs} of one run of nvlink_context_test --bench."""
    out = {}
    for run in report["runs"]:
        if run.get("graph"):
            out[(run["name"], "step, graph")] = run["step_us"]["median"]
            continue
        out[(run["name"], "dispatch")] = run["dispatch_us"]["median"]
        out[(run["name"], "combine")] = run["combine_us"]["median"]
    for run in report.get("phases", []):
        for op in ("dispatch", "combine"):
            ends = [p["last_us"] for p in run["phases"] if p["op"] == op]
            if ends:
                out[(run["name"], f"{op}, phases' end")] = ends[-1]
        # Where a change moved time: when the last block got past each phase.
        for p in run["phases"]:
            out[(run["name"], f"{p['op']}: {p['phase']}, last block")] = p["last_us"]
    return out


def main(argv):
    paths = argv[1:]
    runs = collections.defaultdict(list)  # variant -> [figures of one round]
    for path in sorted(paths):
        m = re.fullmatch(r"ab_(.+)_round(\d+)\.json", os.path.basename(path))
        if not m:
            raise SystemExit(f"{path}: not an ab_<variant>_round<r>.json")
        with open(path) as f:
            runs[m.group(1)].append(_figures(json.load(f)))
    if "this" not in runs:
        raise SystemExit("no run of 'this' (the tree the stage ran in) to compare against")
    revisions = {}
    if FLAGS.revisions and os.path.exists(FLAGS.revisions):
        with open(FLAGS.revisions) as f:
            revisions = dict(line.split(maxsplit=1) for line in f.read().split("\n") if line)
    variants = ["this"] + sorted(v for v in runs if v != "this")
    keys = list(runs["this"][0])
    table = {}
    for v in variants:
        for key in keys:
            values = [r[key] for r in runs[v] if key in r]
            if values:
                table[(v, key)] = (statistics.median(values), max(values) - min(values))
    report = {"date": bench_report.now(), "machine": bench_report.machine(),
              "command": bench_report.command(), "revisions": revisions,
              "rounds": {v: len(runs[v]) for v in variants},
              "figures": [{"variant": v, "case": c, "metric": m, "median_us": table[(v, (c, m))][0],
                           "spread_us": table[(v, (c, m))][1]}
                          for v in variants for (c, m) in keys if (v, (c, m)) in table]}
    head = "| case | what | " + " | ".join(
        ["this (spread)"] + [f"{v} (spread) | {v} - this" for v in variants[1:]]) + " |"
    rule = "|---|---|" + "---|" * (1 + 2 * (len(variants) - 1))
    rows = []
    for case, metric in keys:
        base = table[("this", (case, metric))][0]
        cells = [f"{base:.1f} ({table[('this', (case, metric))][1]:.1f})"]
        for v in variants[1:]:
            if (v, (case, metric)) not in table:
                cells += ["–", "–"]
                continue
            med, spread = table[(v, (case, metric))]
            cells += [f"{med:.1f} ({spread:.1f})", f"{med - base:+.1f}"]
        rows.append(f"| {case} | {metric} | " + " | ".join(cells) + " |")
    md = (f"# Kernel A/B on one GPU\n\n- date: {report['date']}\n"
          f"- machine: {bench_report.machine_text()}\n- command: `{report['command']}`\n"
          "- variants: " + ", ".join(f"{v} = {revisions.get(v, '?')}" for v in variants) + "\n"
          f"- rounds: {report['rounds']}; µs, median over rounds of each round's median, "
          "(spread over rounds); \"phases' end\": when the op's last block ended, steps one at "
          "a time; \"last block\": when the last block got past that phase (µs from the op's "
          "start)\n\n" + head + "\n" + rule + "\n" + "\n".join(rows) + "\n")
    bench_report.write(FLAGS.out, FLAGS.name, report, md)


if __name__ == "__main__":
    app.run(main)
