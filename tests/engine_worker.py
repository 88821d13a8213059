"""Per-rank bodies of the multi-process TransferEngine tests (run through launch.run).

Every rank derives what it sends from (seed, rank, step), so a receiver recomputes each
sender's bytes and slices independently and checks what landed bit for bit. Ranks print
one line ``RESULT {json}`` that the test reads.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time

import numpy as np


from jax_efa_moe import _jem, bootstrap

SLOT = 1 << 16  # bytes of a receiver's buffer reserved per (step, sender)
SEND_BYTES = 1 << 18
TIMEOUT_S = 60.0


def _flags(args):
    p = argparse.ArgumentParser()
    p.add_argument("--provider", default="tcp;ofi_rxm")
    p.add_argument("--domains", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--victim", type=int, default=-1)
    p.add_argument("--deadline", type=float, default=3.0)
    p.add_argument("--reorder_seed", type=int, default=0)
    return p.parse_args(args)


class Rank:
    """An engine with a random send buffer and a zeroed receive buffer, wired to every peer."""

    def __init__(self, rank, world, flags, recv_bytes):
        self.rank, self.world, self.flags = rank, world, flags
        self.engine = _jem.Engine(provider=flags.provider, num_domains=flags.domains,
                                  reorder_seed=flags.reorder_seed)
        self.send = source_bytes(flags.seed, rank)
        self.recv = np.zeros(recv_bytes, np.uint8)
        self.send_region = self.engine.register(self.send)
        self.recv_region = self.engine.register(self.recv)
        addresses = bootstrap.all_gather_bytes("addr", self.engine.address(), rank, world)
        descriptors = bootstrap.all_gather_bytes(
            "desc", self.recv_region.descriptor(), rank, world)
        self.peers = [r for r in range(world) if r != rank]  # group index -> rank
        self.group = self.engine.add_peer_group(
            self.send_region, [(addresses[r], descriptors[r]) for r in self.peers])

    def barrier(self, imm):
        ticket = self.engine.barrier(self.group, imm)
        self.engine.wait_imm(imm, self.world - 1, TIMEOUT_S)
        self.engine.wait_sent(ticket, TIMEOUT_S)

    def finish(self, result):
        # Every rank has received everything before anyone closes its endpoints.
        self.barrier(1)
        bootstrap.all_gather_bytes("done", b"", self.rank, self.world)
        self.engine.close()
        print("RESULT " + json.dumps(result), flush=True)


def source_bytes(seed, rank):
    return np.random.default_rng([seed, rank, 1]).integers(0, 256, SEND_BYTES, dtype=np.uint8)


def slices(seed, sender, receiver, step):
    """(src_offset, dst_offset_in_slot, length) of sender's write to receiver at step."""
    rng = np.random.default_rng([seed, sender, receiver, step, 2])
    length = int(rng.integers(0, SLOT + 1))
    return int(rng.integers(0, SEND_BYTES - length + 1)), int(rng.integers(0, SLOT - length + 1)), length


def slot_offset(step, sender, world):
    return (step * world + sender) * SLOT


IMM_VALUES = range(1000, 1005)  # immediates of the concurrency check


def imm_plan(seed, sender, world):
    """Scatters of the concurrency check: per scatter an immediate and writes per peer."""
    rng = np.random.default_rng([seed, sender, 3])
    return [(int(IMM_VALUES[rng.integers(0, len(IMM_VALUES))]), int(rng.integers(1, 4)))
            for _ in range(40)]


def drain(engine, values, counts):
    """Consumes every arrival of `values` now present, adding them to `counts`; returns how many."""
    n = 0
    for imm in values:
        while engine.try_consume_imm(imm, 1):
            counts[imm] = counts.get(imm, 0) + 1
            n += 1
    return n


def exchange(rank, world, args):
    """Random slices to every peer, exact immediate counts under concurrency, barriers."""
    f = _flags(args)
    me = Rank(rank, world, f, f.steps * world * SLOT)
    checked = 0
    for step in range(f.steps):
        writes = []
        for i, peer in enumerate(me.peers):
            src, dst, length = slices(f.seed, rank, peer, step)
            writes.append((i, src, slot_offset(step, rank, world) + dst, length))
        ticket = me.engine.scatter(me.group, writes, 100 + step)
        me.engine.wait_imm(100 + step, world - 1, TIMEOUT_S)
        me.engine.wait_sent(ticket, TIMEOUT_S)
        for sender in me.peers:
            src, dst, length = slices(f.seed, sender, rank, step)
            got = me.recv[slot_offset(step, sender, world) + dst:][:length]
            want = source_bytes(f.seed, sender)[src:src + length]
            if not np.array_equal(got, want):
                raise AssertionError(f"step {step}: bytes from rank {sender} differ at "
                                     f"{int(np.argmax(got != want))} of {length}")
            checked += length

    # Many scatters in flight from two threads at once, each of several zero-length and short
    # writes per peer; receivers know each sender's plan and expect exact counts.
    plan = imm_plan(f.seed, rank, world)
    tickets = []

    def submit(part):
        for imm, per_peer in part:
            writes = np.array([[i, 0, 0, (k * 8) % 24] for i in range(len(me.peers))
                               for k in range(per_peer)], np.int64)
            tickets.append(me.engine.scatter(me.group, writes, imm))

    threads = [threading.Thread(target=submit, args=(plan[j::2],)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # What actually arrived, counted as it is consumed; the plan's total only says how long to
    # wait (the test compares the counts with the plan).
    total = sum(per_peer for sender in me.peers for _, per_peer in imm_plan(f.seed, sender, world))
    arrived = {}
    deadline = time.monotonic() + TIMEOUT_S
    while drain(me.engine, IMM_VALUES, arrived) or sum(arrived.values()) < total:
        if time.monotonic() > deadline:
            break
        time.sleep(0.0005)
    for t in tickets:
        me.engine.wait_sent(t, TIMEOUT_S)
    me.barrier(2)
    for i in range(3):
        me.barrier(10 + i)
    # Nothing may be left, or come late: every immediate this run used, drained again.
    late = {}
    drain(me.engine, [*range(100, 100 + f.steps), *IMM_VALUES, 2, 10, 11, 12], late)
    me.finish({"checked_bytes": checked, "arrived": arrived, "late": late,
               "peer_domains": [me.engine.peer_domain(me.group, i) for i in range(len(me.peers))],
               "domain_names": [me.engine.domain_name(d) for d in range(f.domains)]})


def _rss_kib():
    with open("/proc/self/status") as s:
        return next(int(line.split()[1]) for line in s if line.startswith("VmRSS:"))


def _fds():
    return len(os.listdir("/proc/self/fd"))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_kib():
    """Bytes malloc has handed out and not had back (glibc mallinfo2), in KiB."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024


def _usage():
    return {"rss_kib": _rss_kib(), "heap_kib": _heap_kib(), "fds": _fds()}


def soak(rank, world, args):
    """Many small steps; memory and open file descriptors must not grow after warm-up."""
    f = _flags(args)
    me = Rank(rank, world, f, world * SLOT)
    rng = np.random.default_rng([f.seed, rank, 4])
    samples = {}
    warmup = min(1000, f.steps // 5)
    for step in range(f.steps):
        if step == warmup:
            samples["warm"] = _usage()
        n = len(me.peers)
        writes = np.empty((n, 4), np.int64)
        writes[:, 0] = np.arange(n)
        writes[:, 1] = rng.integers(0, 1024, n)
        writes[:, 2] = rank * SLOT
        writes[:, 3] = rng.integers(0, 256, n)
        ticket = me.engine.scatter(me.group, writes, step % 3)
        me.engine.wait_imm(step % 3, n, TIMEOUT_S)
        me.engine.wait_sent(ticket, TIMEOUT_S)
    samples["end"] = _usage()
    me.finish(samples)


def kill(rank, world, args):
    """Rank `victim` dies abruptly mid-run; the others must fail with an error in time."""
    f = _flags(args)
    me = Rank(rank, world, f, world * SLOT)
    n = len(me.peers)
    writes = [(i, 0, rank * SLOT, 4096) for i in range(n)]
    last_ok = time.monotonic()
    for step in range(100000):
        if rank == f.victim and step == 20:
            print("RESULT " + json.dumps({"victim": True}), flush=True)
            os._exit(0)  # no cleanup: like a crash, the kernel closes the sockets
        try:
            ticket = me.engine.scatter(me.group, writes, 5)
            me.engine.wait_imm(5, n, f.deadline)
            me.engine.wait_sent(ticket, f.deadline)
        except (RuntimeError, TimeoutError) as e:
            detected = time.monotonic() - last_ok
            t0 = time.monotonic()
            me.engine.close()
            print("RESULT " + json.dumps({
                "error": type(e).__name__, "message": str(e), "step": step,
                "detect_s": detected, "close_s": time.monotonic() - t0}), flush=True)
            return
        last_ok = time.monotonic()
    raise AssertionError("the victim's death was never noticed")
