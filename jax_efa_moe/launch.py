"""Start one process per rank, each joined to the others through ``jax.distributed``.

Used by the example, the benchmarks and the multi-process tests::

    outputs = launch.run("my_module:main", num_processes=2, args=["--flag"], timeout_s=120)

Each child runs ``main(rank, world, args)`` after ``jax.distributed.initialize``; what it
prints comes back in ``outputs``. If any child fails or the deadline passes, every child is
killed and :class:`LaunchError` names the failing rank with the end of its output.
"""

from __future__ import annotations

import glob
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback


_LEAVE_TIMEOUT_S = 60.0


class LaunchError(RuntimeError):
    """A child process failed or did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_count() -> int:
    try:
        from jax_efa_moe import _jem
    except ImportError:
        return 0
    return _jem.cuda_device_count() if getattr(_jem, "has_cuda", False) else 0


def run(target: str, num_processes: int, args: list[str] | tuple[str, ...] = (), *,
        timeout_s: float = 300.0, env: dict[str, str] | None = None,
        platform: str = "cpu") -> list[str]:
    """Runs ``target`` ("module:function") in ``num_processes`` processes; returns their stdout.

    ``platform`` "cpu" gives each process one CPU device; "cuda" gives process i GPU i, or
    every GPU to a single process; with fewer GPUs than processes, the processes share them
    (process i sees only GPU i mod the count: right for correctness, meaningless for timing).
    """
    coordinator = f"127.0.0.1:{free_port()}"
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("FI_TCP_IFACE", "lo")
    # libfabric's psm providers load a library that drops *.btr backtrace files in the working
    # directory when a process is killed; the tests kill processes on purpose.
    child_env.setdefault("IPATH_NO_BACKTRACE", "1")
    child_env.setdefault("HFI_NO_BACKTRACE", "1")
    procs, logs = [], []
    for rank in range(num_processes):
        e = dict(child_env, JEM_RANK=str(rank), JEM_WORLD=str(num_processes),
                 JEM_COORDINATOR=coordinator, JEM_PLATFORM=platform,
                 JEM_LAUNCHER_PID=str(os.getpid()))
        if platform == "cpu":
            e["JAX_PLATFORMS"] = "cpu"
        elif num_processes > 1 and 0 < _gpu_count() < num_processes:
            visible = child_env.get("CUDA_VISIBLE_DEVICES", "").split(",")
            gpus = [v for v in visible if v] or [str(i) for i in range(_gpu_count())]
            e.update(CUDA_VISIBLE_DEVICES=gpus[rank % len(gpus)], JEM_SHARED_GPU="1",
                     XLA_PYTHON_CLIENT_PREALLOCATE="false")
        log = tempfile.TemporaryFile(mode="w+b")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jax_efa_moe.launch", target, *args],
            env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)

    def output(i: int) -> str:
        logs[i].seek(0)
        return logs[i].read().decode(errors="replace")

    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{target}: ranks {[i for i, c in enumerate(codes) if c is None]} did not "
                    f"finish within {timeout_s:.0f} s.\n" +
                    "\n".join(f"--- rank {i} ---\n{output(i)[-3000:]}" for i in range(len(procs))))
            time.sleep(0.05)
        if failed is not None:
            # Give the others a moment to report their own view of the failure.
            grace = time.monotonic() + 2.0
            while time.monotonic() < grace and any(p.poll() is None for p in procs):
                time.sleep(0.05)
            raise LaunchError(
                f"{target}: rank {failed} exited with code {procs[failed].returncode}.\n" +
                "\n".join(f"--- rank {i} ---\n{output(i)[-3000:]}" for i in range(len(procs))))
        return [output(i) for i in range(len(procs))]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            _remove_shm_regions(p.pid)
        for log in logs:
            log.close()


def _remove_shm_regions(pid: int) -> None:
    """Removes what libfabric's shm provider left in /dev/shm for a child that is gone.

    It names its regions "<pid>:..."; a child killed before closing its engine leaves them, and
    a later process given the same pid then fails fi_enable with EBUSY.
    """
    for name in glob.glob(f"/dev/shm/{pid}:*"):
        try:
            os.unlink(name)
        except OSError:
            pass


def _child() -> None:
    target, args = sys.argv[1], sys.argv[2:]
    rank, world = int(os.environ["JEM_RANK"]), int(os.environ["JEM_WORLD"])
    import jax

    if os.environ["JEM_PLATFORM"] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        local_devices = None
    else:
        shared = os.environ.get("JEM_SHARED_GPU") == "1"  # this process sees one GPU only
        local_devices = [0] if shared else [rank] if world > 1 else None
    jax.distributed.initialize(os.environ["JEM_COORDINATOR"], num_processes=world,
                               process_id=rank, local_device_ids=local_devices)
    module, function = target.split(":")
    code = 0
    try:
        getattr(importlib.import_module(module), function)(rank, world, args)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        _leave(rank)
    # Skip jax.distributed's shutdown barrier: a rank whose peer died must not wait on it.
    os._exit(code)


def _stat(pid: str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, parent pid, ...; [] if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _running_siblings() -> list[str]:
    """The other ranks of this launch that have not ended (zombies have)."""
    launcher, me = os.environ["JEM_LAUNCHER_PID"], str(os.getpid())
    siblings = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and pid != me:
            fields = _stat(pid)
            if len(fields) > 1 and fields[1] == launcher and fields[0] != "Z":
                siblings.append(pid)
    return siblings


def _leave(rank: int) -> None:
    """Rank 0 hosts jax.distributed's service: were it to exit first, the ranks still running
    would be aborted. So it leaves last, once the other ranks' processes have ended (or after
    a deadline: a hung rank is the launcher's to report). It asks the operating system, not
    the service, so that nothing a leaving rank does to the service can cut the wait short."""
    if rank != 0:
        return
    deadline = time.monotonic() + _LEAVE_TIMEOUT_S
    while _running_siblings() and time.monotonic() < deadline:
        time.sleep(0.01)


if __name__ == "__main__":
    _child()
