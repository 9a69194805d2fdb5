"""ConvVQModel.fold_upsample: the sampling decode's folded up-sampling convs compute the same
function as nearest x2 + 3x3 conv (float round-off apart), with the same parameters."""

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.models.maskbit_tokenizer import ConvVQModel


def test_folded_upsampling_matches_repeat_then_conv():
    tok = ConvVQModel(num_bits=6, hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
    folded = tok.clone(fold_upsample=True)
    bits = jnp.sign(jax.random.normal(jax.random.PRNGKey(3), (2, 4, 5, 6)))  # non-square grid
    params = tok.init(jax.random.PRNGKey(0), bits, method=ConvVQModel.decode_bits)
    params_f = folded.init(jax.random.PRNGKey(0), bits, method=ConvVQModel.decode_bits)
    assert jax.tree.structure(params) == jax.tree.structure(params_f)

    decode = lambda m: (lambda b: m.apply(params, b, method=ConvVQModel.decode_bits))
    ref, out = decode(tok)(bits), decode(folded)(bits)
    assert out.shape == ref.shape == (2, 16, 20, 3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
