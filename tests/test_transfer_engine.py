"""TransferEngine: real processes over tcp;ofi_rxm and shm, and argument checking."""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import time

import numpy as np
import pytest

import engine_worker
from jax_efa_moe import _jem, bootstrap, launch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ["tcp;ofi_rxm", "shm"]


@functools.cache
def unusable(provider: str) -> str | None:
    """Why `provider` cannot be tested here, or None. Probed with two engines in this process."""
    if provider not in _jem.providers():
        return f"libfabric offers no '{provider}' RDM provider here: {_jem.providers()}"
    try:
        with _jem.Engine(provider=provider) as a, _jem.Engine(provider=provider) as b:
            src, dst = np.arange(64, dtype=np.uint8), np.zeros(64, np.uint8)
            ra, rb = a.register(src), b.register(dst)
            group = a.add_peer_group(ra, [(b.address(), rb.descriptor())])
            a.wait_sent(a.scatter(group, [(0, 0, 0, 64)], 1), 10)
            b.wait_imm(1, 1, 10)
            if not np.array_equal(src, dst):
                return f"'{provider}' delivered wrong bytes in a probe"
    except (RuntimeError, TimeoutError) as e:
        return f"'{provider}' does not work here: {e}"
    return None


def need(provider):
    reason = unusable(provider)
    if reason:
        pytest.skip(reason)


def run(function, world, args, timeout_s=180.0):
    """Runs engine_worker.<function> on `world` ranks; returns each rank's RESULT dict."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))}
    outputs = launch.run(f"engine_worker:{function}", world, list(args), timeout_s=timeout_s,
                         env=env)
    results = []
    for rank, out in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"rank {rank} printed no result:\n{out[-3000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def reorder_args(reorder):
    """Worker flags for the reorder test mode: a fresh seed each run (printed on failure)."""
    return ["--reorder_seed", str(random.randrange(1, 1 << 30))] if reorder else []


@pytest.mark.parametrize("reorder", [False, True], ids=["ordered", "reordered"])
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_scatter_immediates_barrier(provider, world, reorder):
    need(provider)
    seed = random.randrange(1 << 30)
    results = run("exchange", world, ["--provider", provider, "--seed", str(seed),
                                      *reorder_args(reorder)])
    check_exchange(results, world, seed)


def check_exchange(results, world, seed):
    """Bytes were checked by the ranks; here the immediates each rank actually consumed must
    match, value by value, what its peers' plans sent it, with nothing left over."""
    for rank, r in enumerate(results):
        assert r["checked_bytes"] > 0, (rank, seed)
        want = collections.Counter()
        for sender in range(world):
            if sender != rank:
                for imm, per_peer in engine_worker.imm_plan(seed, sender, world):
                    want[imm] += per_peer
        got = {int(imm): n for imm, n in r["arrived"].items()}
        assert got == dict(want), f"rank {rank} (seed {seed}): arrived {got}, sent {dict(want)}"
        assert r["late"] == {}, f"rank {rank} (seed {seed}): arrivals left over {r['late']}"


@pytest.mark.parametrize("reorder", [False, True], ids=["ordered", "reordered"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_two_domains_split_peers(provider, reorder):
    need(provider)
    seed = random.randrange(1 << 30)
    results = run("exchange", 4, ["--provider", provider, "--domains", "2", "--seed", str(seed),
                                  *reorder_args(reorder)])
    check_exchange(results, 4, seed)
    for rank, r in enumerate(results):
        # Peers 0 and 2 through domain 0, peer 1 through domain 1: both carried the bytes each
        # rank checked from every peer.
        assert r["peer_domains"] == [0, 1, 0], (rank, r["peer_domains"])
        assert len(r["domain_names"]) == 2 and all(r["domain_names"]), r["domain_names"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_soak_has_no_growth(provider):
    need(provider)
    results = run("soak", 2, ["--provider", provider, "--steps", "10000",
                              "--seed", str(random.randrange(1 << 30))])
    for rank, r in enumerate(results):
        warm, end = r["warm"], r["end"]
        assert end["fds"] == warm["fds"], f"rank {rank}: open fds grew: {warm} -> {end}"
        # 9,000 steps after warm-up: 256 KiB is under 30 bytes a step.
        assert end["heap_kib"] - warm["heap_kib"] < 256, f"rank {rank}: heap grew: {warm} -> {end}"
        if provider == "shm":
            assert end["rss_kib"] - warm["rss_kib"] < 256, f"rank {rank}: RSS grew: {warm} -> {end}"
        # tcp;ofi_rxm (libfabric 1.17) first-touches the buffer pools it allocated at fi_enable
        # a little per write (about 90 bytes of RSS per write, flat after ~400k writes; its
        # malloc'd bytes stay flat), so there RSS is only bounded, by that rate.
        assert end["rss_kib"] - warm["rss_kib"] < 2048, f"rank {rank}: RSS grew: {warm} -> {end}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_killed_peer_fails_others_in_time(provider):
    need(provider)
    deadline = 3.0
    results = run("kill", 3, ["--provider", provider, "--victim", "2",
                              "--deadline", str(deadline)], timeout_s=120)
    assert results[2] == {"victim": True}
    for rank in (0, 1):
        r = results[rank]
        assert r["error"] in ("RuntimeError", "TimeoutError"), r
        assert r["message"], r
        # One wait's deadline, plus scheduling slack on two shared cores.
        assert r["detect_s"] < 2 * deadline + 5, r
        assert r["close_s"] < 10, r


# --- argument checking, in this process -------------------------------------------------


@pytest.fixture
def pair():
    need("tcp;ofi_rxm")
    a, b = _jem.Engine(), _jem.Engine()
    src, dst = np.zeros(4096, np.uint8), np.zeros(1024, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    group = a.add_peer_group(ra, [(b.address(), rb.descriptor())])
    yield a, b, ra, rb, group
    a.close()
    b.close()


def test_unknown_provider_lists_available():
    with pytest.raises(RuntimeError, match="Providers available:.*tcp;ofi_rxm"):
        _jem.Engine(provider="no-such-provider")
    assert "tcp;ofi_rxm" in _jem.providers()


def test_bad_engine_options():
    with pytest.raises(RuntimeError, match="num_domains"):
        _jem.Engine(num_domains=0)
    with pytest.raises(RuntimeError, match="cannot pin the proxy thread to CPU 100000"):
        _jem.Engine(pin_cpu=100000)
    with pytest.raises(RuntimeError, match="cannot pin the proxy thread to CPU 1000: Invalid"):
        _jem.Engine(pin_cpu=1000)


def test_register_rejects_unusable_arrays():
    need("tcp;ofi_rxm")
    with _jem.Engine() as e:
        with pytest.raises(TypeError, match="C-contiguous"):
            e.register(np.zeros((8, 8), np.float32)[:, ::2])
        ro = np.zeros(16, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(TypeError, match="writable"):
            e.register(ro)
        with pytest.raises(ValueError, match="empty"):
            e.register(np.zeros(0, np.uint8))


def test_offsets_and_lengths_out_of_range(pair):
    a, _, _, _, group = pair
    with pytest.raises(RuntimeError, match="overruns the local region of 4096"):
        a.scatter(group, [(0, 4000, 0, 100)], 1)
    with pytest.raises(RuntimeError, match="overruns peer 0's region of 1024"):
        a.scatter(group, [(0, 0, 1000, 100)], 1)
    with pytest.raises(RuntimeError, match="overruns"):
        a.scatter(group, np.array([[0, 0, 2**62, 1]], np.int64), 1)
    with pytest.raises(ValueError, match="negative"):
        a.scatter(group, [(0, -1, 0, 1)], 1)
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        a.scatter(group, np.zeros((2, 3), np.int64), 1)
    with pytest.raises(TypeError):
        a.scatter(group, [(0, 1, 2)], 1)
    with pytest.raises(TypeError):
        a.scatter(group, [(0, 0, 0, 1)], 2**32)


def test_unknown_peer_group_and_ticket(pair):
    a, _, _, _, group = pair
    with pytest.raises(RuntimeError, match="peer group 0 has 1 peers"):
        a.scatter(group, [(1, 0, 0, 8)], 1)
    with pytest.raises(RuntimeError, match="unknown peer group 99"):
        a.scatter(99, [(0, 0, 0, 8)], 1)
    with pytest.raises(RuntimeError, match="unknown peer group"):
        a.barrier(99, 1)
    with pytest.raises(RuntimeError, match="unknown send ticket"):
        a.wait_sent(12345, 1.0)


def test_unregistered_buffers(pair):
    a, b, ra, rb, group = pair
    with pytest.raises(ValueError, match="different engine"):
        a.add_peer_group(rb, [(b.address(), rb.descriptor())])
    a.deregister(ra)
    with pytest.raises(RuntimeError, match="not registered"):
        a.scatter(group, [(0, 0, 0, 8)], 1)
    with pytest.raises(RuntimeError, match="not registered"):
        a.add_peer_group(ra, [(b.address(), rb.descriptor())])
    with pytest.raises(RuntimeError, match="not registered"):
        ra.descriptor()


def test_malformed_peer_bytes(pair):
    a, b, ra, rb, _ = pair
    with pytest.raises(RuntimeError, match="peer 0: engine address is malformed"):
        a.add_peer_group(ra, [(b"garbage", rb.descriptor())])
    with pytest.raises(RuntimeError, match="peer 0: region descriptor is malformed"):
        a.add_peer_group(ra, [(b.address(), rb.descriptor()[:-3])])


def test_waits_have_deadlines_and_counts_are_consumed(pair):
    a, b, _, _, group = pair
    with pytest.raises(TimeoutError, match="immediate 77"):
        b.wait_imm(77, 1, 0.1)
    a.wait_sent(a.scatter(group, [(0, 0, 0, 0)] * 3, 77), 10)
    b.wait_imm(77, 2, 10)
    b.wait_imm(77, 1, 10)
    with pytest.raises(TimeoutError, match=r"\(0 arrived\)"):
        b.wait_imm(77, 1, 0.1)


def test_write_to_closed_peer_fails_in_time(pair):
    a, b, _, _, group = pair
    a.wait_sent(a.scatter(group, [(0, 0, 0, 64)], 3), 10)
    b.wait_imm(3, 1, 10)
    b.close()
    # tcp;ofi_rxm mostly fails the write (broken pipe); sometimes its completion never comes
    # and the deadline reports it instead.
    start = time.monotonic()
    with pytest.raises((RuntimeError, TimeoutError),
                       match="transfer engine failed: a write to peer 0 .*failed|did not complete"):
        while time.monotonic() - start < 10:
            a.wait_sent(a.scatter(group, [(0, 0, 0, 64)], 3), 2)
    assert time.monotonic() - start < 10
    if a.failure_message():
        # Once failed, every wait reports the failure at once instead of running out its deadline.
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="transfer engine failed"):
            a.wait_imm(3, 1, 30)
        assert time.monotonic() - start < 1


def test_closed_engine(pair):
    a, _, ra, _, group = pair
    a.close()
    with pytest.raises(RuntimeError, match="closed"):
        a.scatter(group, [(0, 0, 0, 8)], 1)
    with pytest.raises(RuntimeError, match="closed"):
        ra.descriptor()


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_reorder_mode_delivers_out_of_order(via, monkeypatch):
    """Immediates 0..n-1 written in order arrive out of order, each exactly once.

    Each pass checks the values from the last to the first: in order, a value seen implies
    every earlier one was visible later in the same pass, so seeing a later value in an
    earlier pass than an earlier value proves reordering.
    """
    need("tcp;ofi_rxm")
    n, rounds = 64, 20
    seed = random.randrange(1, 1 << 30)
    with _jem.Engine() as a:
        if via == "environment":
            monkeypatch.setenv("JEM_REORDER_SEED", str(seed))
        with _jem.Engine(reorder_seed=seed if via == "argument" else 0) as b:
            ra, rb = a.register(np.zeros(64, np.uint8)), b.register(np.zeros(64, np.uint8))
            group = a.add_peer_group(ra, [(b.address(), rb.descriptor())])
            inverted = 0
            for _ in range(rounds):
                tickets = [a.scatter(group, [(0, 0, 0, 0)], imm) for imm in range(n)]
                seen_in_pass = {}
                deadline = time.monotonic() + 10
                this_pass = 0
                while len(seen_in_pass) < n and time.monotonic() < deadline:
                    for imm in reversed(range(n)):
                        if imm not in seen_in_pass and b.try_consume_imm(imm, 1):
                            seen_in_pass[imm] = this_pass
                    this_pass += 1
                assert len(seen_in_pass) == n, f"missing immediates (seed {seed})"
                for t in tickets:
                    a.wait_sent(t, 10)
                passes = [seen_in_pass[imm] for imm in range(n)]
                inverted += any(x > y for x, y in zip(passes, passes[1:]))
            assert not any(b.try_consume_imm(imm, 1) for imm in range(n)), f"seed {seed}"
            assert inverted > 0, f"no round of {rounds} was delivered out of order (seed {seed})"


def test_reorder_seed_from_environment_is_checked(monkeypatch):
    monkeypatch.setenv("JEM_REORDER_SEED", "seven")
    with pytest.raises(RuntimeError, match="JEM_REORDER_SEED='seven' is not an unsigned"):
        _jem.Engine()


@pytest.mark.parametrize("reorder", [False, True], ids=["ordered", "reordered"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_long_writes_are_split_and_arrive_once(provider, reorder):
    """1 MiB writes capped at an odd chunk size: bytes exact, one immediate per write."""
    need(provider)
    size, chunk, imm = 1 << 20, 40_000, 21
    seed = random.randrange(1, 1 << 30)
    src = np.random.default_rng(seed).integers(0, 256, 2 * size, dtype=np.uint8)
    dst = np.zeros(3 * size, np.uint8)
    with _jem.Engine(provider=provider, max_write_bytes=chunk,
                     reorder_seed=seed if reorder else 0) as a, \
            _jem.Engine(provider=provider, reorder_seed=seed + 1 if reorder else 0) as b:
        ra, rb = a.register(src), b.register(dst)
        group = a.add_peer_group(ra, [(b.address(), rb.descriptor())])
        # Split (1 MiB, and one exactly a whole number of chunks), unsplit, and empty writes.
        writes = [(0, 0, 0, size), (0, size, size, size), (0, 7, 2 * size, chunk),
                  (0, 3, 2 * size + chunk, 5 * chunk), (0, 0, 3 * size - 1, 0)]
        for repeat in range(3):
            dst[:] = 0
            ticket = a.scatter(group, writes, imm)
            b.wait_imm(imm, len(writes), 30)
            for _, s, d, n in writes:
                np.testing.assert_array_equal(dst[d:d + n], src[s:s + n],
                                              err_msg=f"seed {seed}, repeat {repeat}")
            a.wait_sent(ticket, 30)
            with pytest.raises(TimeoutError):
                b.wait_imm(imm, 1, 0.05)
        assert not a.failure_message() and not b.failure_message()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_peers_split_across_domains_and_nic_choice(provider):
    need(provider)
    with _jem.Engine(provider=provider, num_domains=2) as a, _jem.Engine(provider=provider) as b:
        rb = b.register(np.zeros(64, np.uint8))
        group = a.add_peer_group(a.register(np.zeros(64, np.uint8)),
                                 [(b.address(), rb.descriptor())] * 3)
        assert [a.peer_domain(group, p) for p in range(3)] == [0, 1, 0]
        with pytest.raises(RuntimeError, match="peer 3 of peer group"):
            a.peer_domain(group, 3)
        nic = a.domain_name(0)
        assert nic
        with pytest.raises(RuntimeError, match="domain 2 of an engine with 2"):
            a.domain_name(2)
    with _jem.Engine(provider=provider, num_domains=2, nic_names=[nic]) as e:
        assert [e.domain_name(d) for d in range(2)] == [nic, nic]
    with pytest.raises(RuntimeError, match=f"NIC 'nope' .*it offers: .*{nic}"):
        _jem.Engine(provider=provider, nic_names=["nope"])
    if provider == "shm":
        # One NIC: a GPU address is not even looked up; the choice needs several.
        with _jem.Engine(provider=provider, gpu_pci_address="ffff:ff:ff.7") as e:
            assert e.domain_name(0) == nic


def test_bootstrap_single_process():
    assert bootstrap.all_gather_bytes("x", b"abc", 0, 1) == [b"abc"]
    with pytest.raises(RuntimeError, match="jax.distributed.initialize"):
        bootstrap.all_gather_bytes("x", b"abc", 0, 2)
