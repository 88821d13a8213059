"""What every benchmark report records about the run: the machine, the command, percentiles."""

from __future__ import annotations

import datetime
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


def command():
    """The command line as run: interpreter, script and flags."""
    return shlex.join([os.path.basename(sys.executable)] + sys.argv)


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def percentile(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q))
