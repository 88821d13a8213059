"""Timing jitted calls the one way the example and the benchmarks do: compile and run once,
then time `repeats` calls, each until its results are ready (launch included)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np


def time_calls(fn: Callable, args: Sequence, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn(*args), after one untimed call."""
    import jax

    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - t0)
    return seconds


def summary(seconds: Sequence[float], per: float = 1.0, unit: float = 1e6) -> dict[str, float]:
    """Median and p99 of seconds / per, in `unit`s per second (1e6: µs)."""
    values = np.asarray(seconds, np.float64) * unit / per
    return {"median": float(np.median(values)), "p99": float(np.percentile(values, 99))}
