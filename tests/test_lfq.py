import jax.numpy as jnp
import numpy as np

from softdimo_jax.models import lfq


def test_bits_roundtrip_and_split_order():
    idx = jnp.arange(64)
    bits = lfq.indices_to_bits(idx, 6)
    assert bits.shape == (64, 6)
    np.testing.assert_array_equal(lfq.bits_to_indices(bits), idx)
    # bit k of token i is (i >> k) & 1: token 1 has bit 0 set only
    np.testing.assert_array_equal(bits[1], [1, -1, -1, -1, -1, -1])
    sub = lfq.split_indices(idx, 6, 2)
    np.testing.assert_array_equal(sub[:, 0], idx % 8)  # split 0 = low bits
    np.testing.assert_array_equal(sub[:, 1], idx // 8)
    np.testing.assert_array_equal(lfq.merge_splits(sub, 6, 2), idx)
    # split-major concatenation equals the full bit vector
    np.testing.assert_array_equal(lfq.subtokens_to_bits(sub, 6, 2), bits)


def test_mask_subtoken_is_zero_bits():
    m = lfq.mask_id(6, 2)
    assert m == 8
    out = lfq.subtokens_to_bits(jnp.array([[m, 3]]), 6, 2)
    np.testing.assert_array_equal(out[0, :3], 0.0)
    np.testing.assert_array_equal(out[0, 3:], [1, 1, -1])
