"""benchmarks/compare_kernels.py: the kernel A/B table says what the runs say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_json(rng):
    """One round of nvlink_context_test --bench, its figures drawn at random."""
    runs = [{"name": name, "dispatch_us": {"median": float(rng.uniform(5, 200)), "p99": 0.0},
             "combine_us": {"median": float(rng.uniform(5, 200)), "p99": 0.0}}
            for name in ("T=128 whole", "T=4096")]
    runs.append({"name": "T=128 whole, graph", "graph": True,
                 "step_us": {"median": float(rng.uniform(5, 200)), "p99": 0.0}})
    phases = [{"name": "T=128 whole", "steps": 100, "phases": [
        {"op": op, "phase": p, "first_us": 0.0, "last_us": float(rng.uniform(1, 20))}
        for op in ("dispatch", "combine") for p in ("start", "end")]}]
    return {"runs": runs, "phases": phases}


def _expected(rounds):
    """{(case, what): (median, spread)} over rounds, computed here independently."""
    values = {}
    for r in rounds:
        for run in r["runs"]:
            if run.get("graph"):
                values.setdefault((run["name"], "step, graph"), []).append(run["step_us"]["median"])
            else:
                for op in ("dispatch", "combine"):
                    values.setdefault((run["name"], op), []).append(run[f"{op}_us"]["median"])
        for run in r["phases"]:
            for op in ("dispatch", "combine"):
                last = [p["last_us"] for p in run["phases"] if p["op"] == op][-1]
                values.setdefault((run["name"], f"{op}, phases' end"), []).append(last)
            for p in run["phases"]:
                values.setdefault((run["name"], f"{p['op']}: {p['phase']}, last block"),
                                  []).append(p["last_us"])
    return {k: (float(np.median(v)), max(v) - min(v)) for k, v in values.items()}


def test_table_holds_medians_spreads_and_differences(tmp_path):
    rng = np.random.default_rng()
    rounds = {v: [_bench_json(rng) for _ in range(3)] for v in ("this", "other")}
    paths = []
    for v, rs in rounds.items():
        for i, r in enumerate(rs, 1):
            path = tmp_path / f"ab_{v}_round{i}.json"
            path.write_text(json.dumps(r))
            paths.append(str(path))
    (tmp_path / "REVISIONS").write_text("this abc\nother def\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_kernels.py"),
                    f"--revisions={tmp_path / 'REVISIONS'}", f"--out={tmp_path}", *paths],
                   check=True, capture_output=True)
    report = json.loads((tmp_path / "kernels_ab.json").read_text())
    assert report["revisions"] == {"this": "abc", "other": "def"}
    got = {(f["variant"], f["case"], f["metric"]): (f["median_us"], f["spread_us"])
           for f in report["figures"]}
    want = {v: _expected(rs) for v, rs in rounds.items()}
    assert len(got) == sum(len(w) for w in want.values())
    for v, figures in want.items():
        for (case, what), (median, spread) in figures.items():
            np.testing.assert_allclose(got[(v, case, what)], (median, spread), rtol=1e-12)
    table = (tmp_path / "kernels_ab.md").read_text()
    for (case, what), (median, _) in want["this"].items():
        other = want["other"][(case, what)][0]
        row = next(line for line in table.splitlines()
                   if line.startswith(f"| {case} | {what} |"))
        assert f"{median:.1f}" in row and f"{other - median:+.1f}" in row


def test_refuses_runs_without_this(tmp_path):
    path = tmp_path / "ab_other_round1.json"
    path.write_text(json.dumps(_bench_json(np.random.default_rng())))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_kernels.py"),
                           f"--out={tmp_path}", str(path)], capture_output=True, text=True)
    assert done.returncode != 0 and "no run of 'this'" in done.stderr + done.stdout
