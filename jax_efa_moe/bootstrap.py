"""Exchange of setup bytes (engine addresses, region descriptors) between ranks.

Ranks talk through the ``jax.distributed`` key-value store, so anything launched with
``jax.distributed.initialize`` can wire up its engines without another side channel::

    addresses = bootstrap.all_gather_bytes("engine", engine.address(), rank, world)

Every rank must make the same sequence of calls with the same ``key``; each call gets fresh
store keys, so a key may be reused. Without ``jax.distributed`` a one-rank run gets
``[value]`` back.
"""

from __future__ import annotations

import collections

_calls: collections.Counter[str] = collections.Counter()


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def all_gather_bytes(key: str, value: bytes, rank: int, world: int,
                     timeout_s: float = 120.0) -> list[bytes]:
    """Returns every rank's ``value`` for this call, indexed by rank.

    Raises TimeoutError naming the missing rank if one does not publish within ``timeout_s``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    value = bytes(value)
    client = _client()
    if client is None:
        if world != 1:
            raise RuntimeError(
                f"all_gather_bytes over {world} ranks needs jax.distributed.initialize() first")
        return [value]
    call = _calls[key]
    _calls[key] += 1
    prefix = f"jax_efa_moe/{key}/{call}"
    client.key_value_set_bytes(f"{prefix}/{rank}", value)
    out = []
    for r in range(world):
        if r == rank:
            out.append(value)
            continue
        try:
            out.append(bytes(client.blocking_key_value_get_bytes(
                f"{prefix}/{r}", int(timeout_s * 1000))))
        except Exception as e:  # the store reports a deadline as a generic XlaRuntimeError
            raise TimeoutError(
                f"rank {rank}: no '{key}' bytes from rank {r} within {timeout_s:.0f} s "
                f"(call {call}); is every rank running and making the same calls? ({e})") from e
    return out
