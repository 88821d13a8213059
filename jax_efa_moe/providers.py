"""Which libfabric provider the ranks of an AllToAll use.

Every rank must use the same one. ``choose`` is a pure function of what each rank reports
(its host name and the providers it has), so every rank reaches the same answer.
"""

from __future__ import annotations

import socket

# Fastest first; shm only when every rank is on one host; tcp works everywhere.
_NETWORK = ("efa", "verbs;ofi_rxm")
_SAME_HOST = "shm"
_FALLBACK = "tcp;ofi_rxm"


def local_report() -> dict:
    """What this rank contributes to the choice."""
    from jax_efa_moe import _jem

    return {"host": socket.gethostname(), "providers": list(_jem.providers())}


def choose(reports: list[dict]) -> str:
    """efa where every rank has it, then verbs;ofi_rxm, then shm when every rank shares one
    host, else tcp;ofi_rxm."""
    def everywhere(name: str) -> bool:
        return all(name in r["providers"] for r in reports)

    for name in _NETWORK:
        if everywhere(name):
            return name
    if len({r["host"] for r in reports}) == 1 and everywhere(_SAME_HOST):
        return _SAME_HOST
    if not everywhere(_FALLBACK):
        missing = [i for i, r in enumerate(reports) if _FALLBACK not in r["providers"]]
        raise RuntimeError(
            f"no libfabric provider is common to all ranks: ranks {missing} lack "
            f"'{_FALLBACK}' (their providers: {[reports[i]['providers'] for i in missing]}). "
            "Install libfabric with the tcp and rxm providers, or pass fabric_provider=.")
    return _FALLBACK
