"""The MoE layer's experts (jax_efa_moe/moe.py) read only the rows inside the groups.

With ``zero_unused_rows=False`` the GPU kernels leave the rows of ``expert_x`` past the last
group as they were (stale data of an earlier step); combine never reads the expert outputs of
those rows. What must hold is that such rows cannot leak into the rows that are read: here
they hold NaN bit patterns (and NaN scales for float8), and every row inside the groups must
come out bit for bit as with zeroed rows.
"""

import numpy as np
import pytest

import oracle


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_rows_past_the_groups_do_not_reach_the_outputs(dtype):
    import jax
    import jax.numpy as jnp
    from jax_efa_moe import moe

    rng = np.random.default_rng([oracle.SEED, 31])
    M, H, F, L = 96, 256, 64, 4
    group_sizes = rng.multinomial(M - 17, np.ones(L) / L).astype(np.int32)  # 17 rows unused
    used = int(group_sizes.sum())
    weights = [(rng.standard_normal(s) / s[-2] ** 0.5).astype(jnp.bfloat16)
               for s in ((L, H, F), (L, H, F), (L, F, H))]
    x, scale = oracle.make_tokens(rng, 1, M, H, dtype)
    x, scale = x[0], None if scale is None else scale[0]

    @jax.jit
    def layer(x, scale):
        rows = (x.astype(jnp.float32) if scale is None else
                moe.dequantize_fp8(x, scale, jnp.float32)).astype(jnp.bfloat16)
        return moe.experts(rows, group_sizes, *weights)

    def with_unused(fill):
        xs = np.array(x)
        xs.view(np.uint8).reshape(M, -1)[used:] = fill
        ss = None if scale is None else np.array(scale)
        if ss is not None:
            ss[used:] = np.nan if fill else 0.0
        return np.asarray(layer(xs, ss))

    zeroed, nan = with_unused(0), with_unused(0xFF)  # 0xFF..: NaN in bf16, f32 and e4m3
    assert np.isfinite(zeroed[:used]).all()
    np.testing.assert_array_equal(nan[:used].view(np.uint32), zeroed[:used].view(np.uint32))
