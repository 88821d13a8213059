"""Expert-parallel MoE dispatch/combine for JAX over libfabric (AWS EFA) and NVLink."""

from jax_efa_moe.api import (
    AllToAll,
    DispatchHandle,
    Dispatched,
    PendingCombine,
    PendingDispatch,
)

__all__ = ["AllToAll", "DispatchHandle", "Dispatched", "PendingCombine", "PendingDispatch"]
