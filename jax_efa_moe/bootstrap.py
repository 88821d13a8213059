"""Exchange of setup bytes (engine addresses, region descriptors) between ranks.

Ranks talk through the ``jax.distributed`` key-value store, so anything launched with
``jax.distributed.initialize`` can wire up its engines without another side channel::

    addresses = bootstrap.all_gather_bytes("engine", engine.address(), rank, world)

Every rank must make the same sequence of calls with the same ``key``; each call gets fresh
store keys, so a key may be reused. Without ``jax.distributed`` a one-rank run gets
``[value]`` back. :class:`Setup` builds the set-up of one object on this: steps in lock step,
where a failure on one process becomes an error on all of them.
"""

from __future__ import annotations

import collections
import json
from typing import Callable

_calls: collections.Counter[str] = collections.Counter()


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _next_prefix(key: str) -> str:
    call = _calls[key]
    _calls[key] += 1
    return f"jax_efa_moe/{key}/{call}"


def all_gather_bytes(key: str, value: bytes, rank: int, world: int,
                     timeout_s: float = 120.0) -> list[bytes]:
    """Returns every rank's ``value`` for this call, indexed by rank.

    Raises TimeoutError naming the missing rank if one does not publish within ``timeout_s``.
    """
    return list(_gather(key, bytes(value), rank, world, timeout_s))


def _gather(key: str, value: bytes, rank: int, world: int, timeout_s: float):
    """Publishes ``value``, then yields every rank's, in rank order, as it arrives."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    client = _client()
    if client is None:
        if world != 1:
            raise RuntimeError(
                f"all_gather_bytes over {world} ranks needs jax.distributed.initialize() first")
        yield value
        return
    prefix = _next_prefix(key)
    client.key_value_set_bytes(f"{prefix}/{rank}", value)
    for r in range(world):
        if r == rank:
            yield value
            continue
        try:
            got = bytes(client.blocking_key_value_get_bytes(f"{prefix}/{r}",
                                                            int(timeout_s * 1000)))
        except Exception as e:  # the store reports a deadline as a generic XlaRuntimeError
            raise TimeoutError(
                f"rank {rank}: no '{key}' bytes from rank {r} within {timeout_s:g} s "
                f"({prefix}); is every rank running and making the same calls? ({e})") from e
        yield got


def _publish(key: str, value: bytes, rank: int) -> None:
    """Publishes this rank's value of the next call of ``key`` without waiting for anyone."""
    client = _client()
    if client is not None:
        client.key_value_set_bytes(f"{_next_prefix(key)}/{rank}", value)


class SetupError(RuntimeError):
    """Another process failed while setting up the same object."""


class Setup:
    """The set-up of one object (an AllToAll) on every process, in named steps.

    At each step every process publishes a JSON payload, or the error that stopped it, under
    fresh keys; every process raises at the first error it reads, so all of them stop at the
    same step and the next set-up's keys still match. Waits for a peer last ``timeout_s``;
    after a timeout the processes stand at different steps, so later set-ups fail too.
    ``label`` names this process in messages ("rank 1").
    """

    def __init__(self, name: str, timeout_s: float, label: str | None = None):
        import jax

        self.name, self.timeout_s = name, timeout_s
        self.process, self.world = jax.process_index(), jax.process_count()
        self.label = label or f"process {self.process}"

    def fail(self, step: str, error: BaseException) -> None:
        """Tells every process that this one stopped at ``step`` with ``error``; the caller
        then raises it."""
        payload = {"label": self.label, "error": f"{type(error).__name__}: {error}"}
        _publish(f"{self.name}/{step}", json.dumps(payload).encode(), self.process)

    def run(self, step: str, make_payload: Callable[[], dict]) -> list[dict]:
        """Runs ``make_payload`` here and exchanges the results; -> every process's payload."""
        try:
            payload = make_payload()
        except Exception as e:
            self.fail(step, e)
            raise
        return self.exchange(step, payload)

    def exchange(self, step: str, payload: dict) -> list[dict]:
        """-> every process's payload, by process; SetupError at the first failure read."""
        mine = json.dumps({"label": self.label, **payload}).encode()
        out = []
        try:
            for raw in _gather(f"{self.name}/{step}", mine, self.process, self.world,
                               self.timeout_s):
                theirs = json.loads(raw.decode())
                if "error" in theirs:
                    raise SetupError(f"{self.name} set-up failed on {theirs['label']} "
                                     f"(step '{step}'): {theirs['error']}")
                out.append(theirs)
        except TimeoutError as e:
            raise TimeoutError(f"{self.name} set-up, step '{step}': {e}. A process that is "
                               "not running, or that failed before publishing, looks like "
                               "this.") from e
        return out

    def agree(self, step: str, fingerprint: dict) -> None:
        """Raises ValueError on every process, naming the fields and the processes, unless
        all of them published the same ``fingerprint``."""
        everyone = self.exchange(step, {"fingerprint": fingerprint})
        differences = []
        for field in fingerprint:
            values = collections.defaultdict(list)
            for p in everyone:
                values[json.dumps(p["fingerprint"].get(field))].append(p["label"])
            if len(values) > 1:
                differences.append(f"{field}: " + ", ".join(
                    f"{' and '.join(labels)} {'has' if len(labels) == 1 else 'have'} "
                    f"{json.loads(v)}" for v, labels in values.items()))
        if differences:
            raise ValueError(f"{self.name} was created with different arguments on different "
                             "ranks (every rank must pass the same): " + "; ".join(differences))
