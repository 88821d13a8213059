"""benchmarks/efa_model.py: its routing statistics against Monte Carlo (fresh seed, printed on
failure), and its totals against its parts. No GPU, well under a second."""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import efa_model as m  # noqa: E402

FABRIC_PARTS = ("signal", "post", "efa_wire", "efa_latency", "release")


@pytest.mark.parametrize("ranks", [8, 16, 32, 64])
def test_distinct_ranks_match_monte_carlo(ranks):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    tokens = 5000
    experts = np.argpartition(rng.random((tokens, m.EXPERTS)), m.TOPK, axis=1)[:, :m.TOPK]
    owners = np.sort(experts // (m.EXPERTS // ranks), axis=1)
    distinct = 1 + (np.diff(owners, axis=1) != 0).sum(axis=1)
    exact = m.expected_distinct_ranks(m.EXPERTS, ranks, m.TOPK)
    tolerance = 5 * distinct.std() / np.sqrt(tokens)
    assert abs(distinct.mean() - exact) < tolerance, (seed, distinct.mean(), exact)


def test_expected_max_binomial_matches_monte_carlo():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    n, p, gpus = 56 * m.TOKENS, 0.12, 64
    assert m.expected_max_binomial(n, p, 1) == pytest.approx(n * p, rel=1e-9)
    sample = rng.binomial(n, p, size=(2000, gpus)).max(axis=1)
    tolerance = 5 * sample.std() / np.sqrt(len(sample))
    assert abs(sample.mean() - m.expected_max_binomial(n, p, gpus)) < tolerance, seed


def inputs(**changes):
    base = m.Inputs(kernel_us={"dispatch": (14.0, 17.0), "combine": (15.0, 13.0)},
                    signal_us=1.4, post_us_per_write=0.25, efa_GBps=50.0, efa_latency_us=15.0,
                    nvlink_GBps=396.0, ranks_per_node=8)
    return dataclasses.replace(base, **changes)


# A slow NVLink makes the NVLink leg the longer one, so both sides of the max are exercised.
@pytest.mark.parametrize("x", [inputs(), inputs(nvlink_GBps=1.0)], ids=["fabric", "nvlink"])
@pytest.mark.parametrize("phase", m.PHASES)
@pytest.mark.parametrize("ranks", [8, 16, 32, 64])
def test_totals_are_sum_and_max_of_parts(x, phase, ranks):
    parts = m.step(phase, ranks, x)
    if ranks <= x.ranks_per_node:
        assert not set(FABRIC_PARTS + ("fabric_leg",)) & set(parts)
    else:
        assert parts["fabric_leg"] == pytest.approx(sum(parts[k] for k in FABRIC_PARTS))
    legs = [parts[k] for k in ("fabric_leg", "nvlink_leg") if k in parts]
    assert parts["total"] == pytest.approx(parts["pack"] + max(legs) + parts["unpack"])
