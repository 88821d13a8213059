"""The one configuration (jax_efa_moe.config): every bad argument fails before anything is
allocated, in the caller's words, alike for AllToAll, ReferenceAllToAll and MoEConfig."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

from jax_efa_moe import AllToAll
from jax_efa_moe.config import INT32_MAX, AllToAllConfig, check_max_sms
from jax_efa_moe.moe import MoEConfig
from jax_efa_moe.reference import ReferenceAllToAll

BASE = dict(num_experts=8, experts_per_token=2, hidden=256, max_tokens_per_rank=16)

# (overrides of BASE, error type, words of the message); one rank.
SHARED = [
    # The most rows one rank may need (1 x 2**28 x 8) no longer fits an int32 row index.
    (dict(max_tokens_per_rank=2**28, experts_per_token=8), ValueError,
     f"may have to receive {2**31} rows, more than {INT32_MAX}"),
    (dict(max_tokens_per_rank=2**31), ValueError,
     f"max_tokens_per_rank = {2**31} is more than {INT32_MAX}"),
    (dict(expert_alignment=2**30), ValueError, "expert_alignment = 1073741824, one rank may"),
    (dict(max_recv_tokens=2**31), ValueError, f"max_recv_tokens = {2**31} is more than"),
    (dict(hidden=2**31), ValueError, f"hidden = {2**31} is more than"),
    (dict(expert_alignment=True), TypeError, "expert_alignment must be an integer, got True"),
    (dict(hidden=256.0), TypeError, "hidden must be an integer, got 256.0"),
    (dict(num_experts=0), ValueError, "num_experts must be a positive integer, got 0"),
    (dict(max_recv_tokens=0), ValueError, "max_recv_tokens must be a positive integer"),
    (dict(experts_per_token=9), ValueError, "experts_per_token = 9 exceeds num_experts = 8"),
    (dict(dispatch_dtype=jnp.float16), TypeError, "dispatch_dtype must be one of"),
    (dict(combine_dtype=jnp.float8_e4m3fn), TypeError, "combine_dtype must be one of"),
    (dict(dispatch_dtype=jnp.float8_e4m3fn, hidden=100), ValueError,
     "hidden = 100 must be a multiple of 128"),
]

ALL_TO_ALL_ONLY = [
    (dict(timeout_s=math.inf), ValueError, "timeout_s must be a finite number of seconds"),
    (dict(timeout_s=0), ValueError, "timeout_s must be a finite number of seconds"),
    (dict(timeout_s=True), TypeError, "timeout_s must be a number of seconds, got True"),
    (dict(zero_unused_rows=1), TypeError, "zero_unused_rows must be True or False, got 1"),
    (dict(ranks_per_node=True), TypeError, "ranks_per_node must be an integer"),
    (dict(ranks_per_node=2), ValueError, "ranks_per_node = 2 must divide the 1 ranks"),
    (dict(transport="nvlink"), ValueError, "transport='nvlink' needs GPUs"),
    (dict(transport="carrier pigeon"), ValueError, "transport must be one of"),
    (dict(fabric_provider=3), TypeError, "fabric_provider must be a libfabric provider name"),
    (dict(max_sms=0), ValueError, "max_sms must be a positive integer, got 0"),
    (dict(max_sms=-4), ValueError, "max_sms must be a positive integer, got -4"),
    (dict(max_sms=8.0), TypeError, "max_sms must be an integer, got 8.0"),
    (dict(max_sms=True), TypeError, "max_sms must be an integer, got True"),
]


def _mesh():
    return jax.make_mesh((1,), ("ep",), devices=jax.devices("cpu")[:1])


@pytest.mark.parametrize("cls", [AllToAll, ReferenceAllToAll])
@pytest.mark.parametrize("overrides, error, words", SHARED)
def test_shared_arguments_are_checked_alike(cls, overrides, error, words):
    with pytest.raises(error, match=re.escape(words)):
        cls(_mesh(), "ep", **{**BASE, **overrides})


@pytest.mark.parametrize("overrides, error, words", ALL_TO_ALL_ONLY)
def test_all_to_all_options_are_checked(overrides, error, words):
    with pytest.raises(error, match=re.escape(words)):
        AllToAll(_mesh(), "ep", **{**BASE, **overrides})


def test_sm_budget_is_checked_against_the_gpu_and_ignored_on_the_cpu():
    # On GPUs the bound is the SMs of this process's GPU with the fewest.
    with pytest.raises(ValueError, match=re.escape(
            "max_sms = 133 is more than the 132 SMs of GPU 0 (NVIDIA H200)")):
        check_max_sms(133, (132, "GPU 0 (NVIDIA H200)"))
    assert check_max_sms(132, (132, "GPU 0 (NVIDIA H200)")) == 132
    assert check_max_sms(None, (132, "GPU 0 (NVIDIA H200)")) is None
    # On the CPU any positive count is accepted and bounds nothing, so one script runs on both;
    # the gradients' twin gets the same budget.
    with AllToAll(_mesh(), "ep", max_sms=10_000, **BASE) as comm:
        assert comm.max_sms == 10_000
        assert comm._gradients.twin.max_sms == 10_000


def test_reference_options_are_checked():
    with pytest.raises(TypeError, match="check must be True or False, got 1"):
        ReferenceAllToAll(_mesh(), "ep", check=1, **BASE)
    with pytest.raises(ValueError, match="exchange must be"):
        ReferenceAllToAll(_mesh(), "ep", exchange="ragd", **BASE)


def test_mesh_and_axis_are_checked():
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        AllToAll("ep", "ep", **BASE)
    with pytest.raises(ValueError, match="axis_name 'tp' is not an axis of the mesh"):
        ReferenceAllToAll(_mesh(), "tp", **BASE)


def test_an_arena_past_int64_is_refused_before_the_cxx_side_sums_it():
    # Each field fits int32, and so does every row index; the arena's bytes would not fit the
    # int64 the C++ layout sums them in.
    config = AllToAllConfig(num_ranks=2, num_experts=2, experts_per_token=1, hidden=INT32_MAX,
                            max_tokens_per_rank=2**29, dispatch_dtype=jnp.float32)
    with pytest.raises(ValueError, match="more than an int64 can count"):
        config.layout()


def test_one_configuration_for_every_user():
    """AllToAll and the reference hold equal configurations, read under the same names, and
    MoEConfig's fields build the same one."""
    mesh = _mesh()
    kw = dict(BASE, dispatch_dtype=jnp.float8_e4m3fn, expert_alignment=4)
    with AllToAll(mesh, "ep", **kw) as comm:
        ref = ReferenceAllToAll(mesh, "ep", **kw)
        assert comm.config == ref.config
        for name in ("local_experts", "has_scales", "num_scales", "max_recv_tokens"):
            assert getattr(comm, name) == getattr(ref, name) == getattr(comm.config, name)
        # Default rows: every token to each of its k experts here, plus each group's padding.
        assert (comm.local_experts, comm.num_scales,
                comm.max_recv_tokens) == (8, 2, 16 * 2 + 8 * (4 - 1))
        assert comm.zero_unused_rows is True
    moe = MoEConfig(hidden=256, ffn=64, shared_ffn=0, num_experts=8, experts_per_token=2,
                    dispatch_dtype=jnp.float8_e4m3fn)
    assert AllToAllConfig(num_ranks=1, max_tokens_per_rank=16, expert_alignment=4,
                          **moe.comm_kwargs()) == comm.config
    with pytest.raises(ValueError, match="hidden = 100 must be a multiple of 128"):
        MoEConfig(hidden=100, ffn=64, shared_ffn=0, num_experts=8, experts_per_token=2,
                  dispatch_dtype=jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="shared_ffn must be at least 0"):
        MoEConfig(hidden=256, ffn=64, shared_ffn=-1, num_experts=8, experts_per_token=2)
