"""The configuration of an expert-parallel all-to-all, declared and checked in one place.

:class:`AllToAllConfig` holds every size and dtype that fixes the shapes of dispatch and
combine. ``AllToAll`` and ``ReferenceAllToAll`` build one from their arguments and read it as
attributes (``comm.hidden``, ``comm.local_experts``); the op wrappers (``ops``) derive their
result shapes from it and from the C++ ``Layout`` it builds; ``moe.MoEConfig`` checks its
shared fields with :func:`check_model`. Every check runs when the object is built, before
anything is allocated or traced, and says what to change in the caller's words.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCALE_BLOCK = 128  # float8 dispatch: one float32 scale per 128 channels
DISPATCH_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn)
COMBINE_DTYPES = (jnp.bfloat16, jnp.float32)
# The C++ Layout holds its fields, and every row and record index, as int32.
INT32_MAX = 2**31 - 1
# The C++ side sums the arena's regions in int64 bytes.
INT64_MAX = 2**63 - 1
# Waits on peers become steady-clock deadlines in int64 nanoseconds; the engine caps them here.
MAX_TIMEOUT_S = 1e9


def check_int(name: str, value, low: int = 1, high: int = INT32_MAX) -> int:
    """``value`` as an int in [low, high]; bools and floats are refused, not converted."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low:
        what = "a positive integer" if low == 1 else f"at least {low}"
        raise ValueError(f"{name} must be {what}, got {value}")
    if value > high:
        raise ValueError(f"{name} = {value} is more than {high}, the most the all-to-all's "
                         "int32 buffer layout can hold")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_timeout(value) -> float:
    """A finite, positive number of seconds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"timeout_s must be a number of seconds, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise ValueError(f"timeout_s must be a finite number of seconds in (0, "
                         f"{MAX_TIMEOUT_S:g}], got {value}")
    return value


def check_max_sms(value, gpu_sms: tuple[int, str] | None) -> int | None:
    """None (every SM), or how many SMs each kernel may occupy: from 1 to the SMs of the GPU
    ``gpu_sms`` = (SMs, which GPU) names, this process's GPU with the fewest; None on the CPU,
    where there is nothing to bound."""
    if value is None:
        return None
    value = check_int("max_sms", value)
    if gpu_sms is not None and value > gpu_sms[0]:
        raise ValueError(f"max_sms = {value} is more than the {gpu_sms[0]} SMs of {gpu_sms[1]}; "
                         "use at most that, or None for every SM")
    return value


def check_dtype(name: str, value, allowed) -> np.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise TypeError(f"{name} {value!r} is not a dtype") from e
    if dtype not in [jnp.dtype(a) for a in allowed]:
        raise TypeError(f"{name} must be one of {[jnp.dtype(a).name for a in allowed]}, got "
                        f"{dtype.name}")
    return dtype


def check_model(num_experts, experts_per_token, hidden, dispatch_dtype,
                combine_dtype) -> tuple[int, int, int, np.dtype, np.dtype]:
    """The fields a model fixes whatever the ranks and the batch, checked and normalised."""
    num_experts = check_int("num_experts", num_experts)
    experts_per_token = check_int("experts_per_token", experts_per_token)
    hidden = check_int("hidden", hidden)
    if experts_per_token > num_experts:
        raise ValueError(f"experts_per_token = {experts_per_token} exceeds num_experts = "
                         f"{num_experts}")
    dispatch_dtype = check_dtype("dispatch_dtype", dispatch_dtype, DISPATCH_DTYPES)
    combine_dtype = check_dtype("combine_dtype", combine_dtype, COMBINE_DTYPES)
    if dispatch_dtype == jnp.float8_e4m3fn and hidden % SCALE_BLOCK:
        raise ValueError(f"float8 dispatch carries one scale per {SCALE_BLOCK} channels, so "
                         f"hidden = {hidden} must be a multiple of {SCALE_BLOCK}")
    return num_experts, experts_per_token, hidden, dispatch_dtype, combine_dtype


def axis_size(mesh, axis_name) -> int:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                         f"{mesh.axis_names}")
    return mesh.shape[axis_name]


def varying_axes(x) -> frozenset:
    """The mesh axes over which x (traced inside shard_map) varies."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # named vma before jax 0.10
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


@dataclasses.dataclass(frozen=True)
class AllToAllConfig:
    """Sizes and dtypes of one all-to-all: identical on every rank.

    Rank r holds experts [r * L, (r + 1) * L), L = num_experts / num_ranks. Each rank sends up
    to ``max_tokens_per_rank`` tokens, each to ``experts_per_token`` experts; ``expert_x`` has
    ``max_recv_tokens`` rows (the default fits any routing), each local expert's rows padded to
    a multiple of ``expert_alignment``.
    """

    num_ranks: int
    num_experts: int
    experts_per_token: int
    hidden: int
    max_tokens_per_rank: int
    dispatch_dtype: Any = jnp.bfloat16
    combine_dtype: Any = jnp.bfloat16
    max_recv_tokens: int | None = None
    expert_alignment: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        R = check_int("the number of ranks", self.num_ranks)
        E, k, H, dispatch_dtype, combine_dtype = check_model(
            self.num_experts, self.experts_per_token, self.hidden, self.dispatch_dtype,
            self.combine_dtype)
        T = check_int("max_tokens_per_rank", self.max_tokens_per_rank)
        a = check_int("expert_alignment", self.expert_alignment)
        if E % R:
            raise ValueError(f"num_experts = {E} must be a multiple of the {R} ranks along the "
                             "all-to-all's axis")
        L = E // R
        # The most rows one rank can need: every token of every rank to each local expert it
        # names, each group padded. Row counts and indices are int32 wherever they are summed.
        worst = R * T * min(k, L) + L * (a - 1)
        if worst > INT32_MAX:
            raise ValueError(
                f"with {R} rank{'s' if R > 1 else ''}, max_tokens_per_rank = {T}, {k} of {E} "
                f"experts per token and expert_alignment = {a}, one rank may have to receive "
                f"{worst} rows, more than {INT32_MAX} (row indices are int32); lower "
                "max_tokens_per_rank or expert_alignment")
        M = worst if self.max_recv_tokens is None else check_int("max_recv_tokens",
                                                                  self.max_recv_tokens)
        for name, value in (("num_ranks", R), ("num_experts", E), ("experts_per_token", k),
                            ("hidden", H), ("max_tokens_per_rank", T), ("max_recv_tokens", M),
                            ("expert_alignment", a), ("dispatch_dtype", dispatch_dtype),
                            ("combine_dtype", combine_dtype)):
            set_(name, value)

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def has_scales(self) -> bool:
        return self.dispatch_dtype == jnp.float8_e4m3fn

    @property
    def num_scales(self) -> int:
        """Columns of x_scale: hidden / 128 for float8 dispatch, else 0."""
        return self.hidden // SCALE_BLOCK if self.has_scales else 0

    def layout(self):
        """The C++ buffer layout (cc/base/layout.h) of this configuration."""
        from jax_efa_moe import _jem

        layout = _jem.Layout()
        layout.num_ranks = self.num_ranks
        layout.num_experts = self.num_experts
        layout.experts_per_token = self.experts_per_token
        layout.hidden = self.hidden
        layout.max_tokens = self.max_tokens_per_rank
        layout.max_recv_tokens = self.max_recv_tokens
        layout.expert_alignment = self.expert_alignment
        layout.dispatch_elem_bytes = self.dispatch_dtype.itemsize
        layout.combine_elem_bytes = self.combine_dtype.itemsize
        layout.has_scales = self.has_scales
        # Every region of the arena holds at most this many records or combine rows; with
        # Python's integers this bounds the int64 sum the C++ side computes.
        rows = (layout.send_capacity() + self.num_ranks * layout.private_records() +
                layout.max_recv_records())
        row_bytes = max(layout.record_bytes(), self.hidden * self.combine_dtype.itemsize + 16)
        if 2 * rows * row_bytes + 2**20 > INT64_MAX:
            raise ValueError(f"hidden = {self.hidden} with max_tokens_per_rank = "
                             f"{self.max_tokens_per_rank} needs a buffer of about "
                             f"{2 * rows * row_bytes} bytes, more than an int64 can count")
        return layout

    @functools.cached_property
    def max_recv_records(self) -> int:
        """Rows of a dispatch handle's record arrays (unique tokens one rank can receive)."""
        return self.layout().max_recv_records()

    def fingerprint(self) -> dict[str, int | str]:
        """What every rank must agree on, as readable values."""
        return {f.name: (v.name if isinstance(v, np.dtype) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    # --- per-call checks, shared by AllToAll and ReferenceAllToAll ---

    def check_dispatch_inputs(self, method: str, x, topk_ids, topk_weights, x_scale,
                              num_tokens):
        """-> (x, x_scale or None, topk_ids, topk_weights, num_tokens as an int32 scalar)."""
        T, H, k = self.max_tokens_per_rank, self.hidden, self.experts_per_token
        check_array(method, "x", x, (T, H), self.dispatch_dtype)
        check_array(method, "topk_ids", topk_ids, (T, k), jnp.int32)
        check_array(method, "topk_weights", topk_weights, (T, k), jnp.float32)
        if self.has_scales:
            if x_scale is None:
                raise ValueError(f"{method}: float8 dispatch needs x_scale, float32 "
                                 f"[{T}, {self.num_scales}] (one scale per {SCALE_BLOCK} "
                                 "channels)")
            check_array(method, "x_scale", x_scale, (T, self.num_scales), jnp.float32)
        elif x_scale is not None:
            raise ValueError(f"{method}: x_scale is only for float8 dispatch; this all-to-all "
                             f"dispatches {self.dispatch_dtype.name}")
        if num_tokens is None:
            num_tokens = T
        if isinstance(num_tokens, (int, np.integer)) and not isinstance(num_tokens, bool):
            if not 0 <= num_tokens <= T:
                raise ValueError(f"{method}: num_tokens = {num_tokens} is outside "
                                 f"[0, max_tokens_per_rank = {T}]")
            num_tokens = jnp.asarray(num_tokens, jnp.int32)
        else:
            shape = getattr(num_tokens, "shape", None)
            check_array(method, "num_tokens", num_tokens, (1,) if shape == (1,) else (),
                        jnp.int32)
            num_tokens = num_tokens.reshape(())
        return x, x_scale, topk_ids, topk_weights, num_tokens

    def check_expert_y(self, method: str, expert_y) -> None:
        check_array(method, "expert_y", expert_y, (self.max_recv_tokens, self.hidden),
                    self.combine_dtype)


def check_array(method: str, name: str, value, shape: tuple, dtype) -> None:
    got_shape = getattr(value, "shape", None)
    got_dtype = getattr(value, "dtype", None)
    if got_shape is None or got_dtype is None:
        raise TypeError(f"{method}: {name} must be an array, got {type(value).__name__}")
    if tuple(got_shape) != tuple(shape):
        raise ValueError(f"{method}: {name} has shape {tuple(got_shape)}, expected "
                         f"{tuple(shape)} per rank (inside shard_map over the all-to-all's "
                         "axis)")
    if jnp.dtype(got_dtype) != jnp.dtype(dtype):
        raise TypeError(f"{method}: {name} has dtype {jnp.dtype(got_dtype).name}, expected "
                        f"{jnp.dtype(dtype).name}")


class ConfigAttributes:
    """Reads the configuration as attributes of the object holding it in ``self.config``
    (``comm.hidden``, ``comm.local_experts``), for AllToAll and ReferenceAllToAll alike."""

    config: AllToAllConfig
    _NAMES = frozenset(f.name for f in dataclasses.fields(AllToAllConfig)) | {
        "local_experts", "has_scales", "num_scales"}

    def __getattr__(self, name: str):
        # Only called when ordinary lookup fails; "config" itself must not recurse.
        if name in ConfigAttributes._NAMES and "config" in self.__dict__:
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
