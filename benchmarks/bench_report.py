"""What every benchmark report records about the run (machine, command, date), percentiles,
and writing the report as <name>.json and <name>.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys

import numpy as np


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": platform.node(), "nproc": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release(), "load_avg_at_start": os.getloadavg()}


def machine_text(extra=""):
    """machine() in one line, for a report's header."""
    m = machine()
    return f"{m['host']}: {m['nproc']} cores, {m['cpu_model']}" + (f", {extra}" if extra else "")


def command():
    """The command line as run, from the repository root: interpreter, script and flags."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.relpath(os.path.abspath(sys.argv[0]), root)
    return shlex.join([os.path.basename(sys.executable), script] + sys.argv[1:])


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def percentile(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q))


def write(out_dir, name, report, table):
    """Writes `report` to <out_dir>/<name>.json and `table` (markdown) beside it; prints it."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(table)
    print(table)
