"""`Decoder(remat=True)` recomputes the layers in the backward pass: the same values and the
same gradients as saving them, through a pruning-style sub-range and a carried capture."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import config as config_lib
from jaxmm.models import llama
from jaxmm.models.decoder import causal_mask

CFG = config_lib.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
                             num_heads=4, num_kv_heads=2, head_dim=8)


def _loss(dec, params, x_BxTxD, valid_BxT):
  """A scalar reading both sub-ranges' outputs and the carried attention capture."""
  pos = jnp.cumsum(valid_BxT, 1) - 1
  mask = causal_mask(valid_BxT)
  a = dec.run(params, x_BxTxD, pos, mask, start=0, end=2, capture=("attn_logp",))
  b = dec.run(params, a.x, pos, mask, start=2, end=3)
  logp = jnp.where(mask[:, None], a.last["attn_logp"], 0.0)
  return jnp.sum(b.x ** 2) + jnp.sum(jnp.exp(logp) * jnp.arange(x_BxTxD.shape[1]))


@pytest.mark.parametrize("jit", [False, True])
def test_remat_gives_the_same_gradients(jit):
  params = llama.init_params(CFG, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, CFG.hidden_size))
  valid = jnp.array([[True] * 7, [True] * 5 + [False] * 2])
  grads = {}
  for remat in (False, True):
    dec = dataclasses.replace(llama.Decoder(CFG), remat=remat)
    f = jax.value_and_grad(lambda p, xx: _loss(dec, p, xx, valid), argnums=(0, 1))
    grads[remat] = (jax.jit(f) if jit else f)(params, x)
  (v0, g0), (v1, g1) = grads[False], grads[True]
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    # Recomputation reorders f32 sums: a bound relative to each array's scale.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0[0]["layers"])) > 1e-3

