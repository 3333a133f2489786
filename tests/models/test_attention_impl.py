"""The attention-kernel switch: "dot" (jax.nn.dot_product_attention) computes what jaxmm's own
"xla" einsum form computes, through the layer, the forward and cached generation; "cudnn" off a
GPU and unknown names are one-line errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmm
from jaxmm import config as config_lib
from jaxmm.errors import InputError
from jaxmm.layers import attention
from jaxmm.models import llama


def _qkv(b=2, t=5, s=9, h=4, g=2, k=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, k)), jax.random.normal(ks[1], (b, s, g, k)),
          jax.random.normal(ks[2], (b, s, g, k)))


@pytest.mark.parametrize("jit", [False, True])
def test_dot_matches_the_einsum_form_with_gqa_padding_and_a_cache(jit):
  q, k, v = _qkv()
  # Example 0: causal over a 9-slot cache whose slots 4.. hold the 5 new tokens; example 1 also
  # left padded (slots 4-5 empty, so its first query row is fully masked).
  pos = np.arange(5)[:, None] + 4
  mask = np.arange(9)[None] <= pos
  mask = np.stack([mask, mask & (np.arange(9)[None] >= 6)])
  mask[1, :2] = False                      # fully masked query rows (padding slots)
  f = lambda impl: attention.attend(q, k, v, jnp.asarray(mask), 0.3, impl)
  if jit:
    f = jax.jit(f, static_argnums=0)
  np.testing.assert_allclose(f("dot"), f("xla"), atol=2e-6, rtol=2e-6)


def _model(impl: str):
  cfg = config_lib.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8, attention=impl,
                               eos_token_ids=())
  return jaxmm.api.Model("llama", cfg, llama.init_params(cfg, jax.random.key(1)))


def test_forward_and_cached_generation_agree_across_kernels():
  ids = np.array([[0, 0, 5, 9, 3, 7], [4, 8, 2, 6, 1, 9]])
  mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  xla, dot = _model("xla"), _model("dot")
  a = jaxmm.forward(xla, input_ids=ids, attention_mask=mask).logits
  b = jaxmm.forward(dot, input_ids=ids, attention_mask=mask).logits
  np.testing.assert_allclose(np.asarray(b)[mask == 1], np.asarray(a)[mask == 1], atol=1e-5)
  ga = jaxmm.generate(xla, input_ids=ids, attention_mask=mask, max_new_tokens=4)
  gb = jaxmm.generate(dot, input_ids=ids, attention_mask=mask, max_new_tokens=4)
  np.testing.assert_array_equal(np.asarray(gb), np.asarray(ga))


def test_unknown_or_unavailable_kernels_are_one_line_errors():
  with pytest.raises(InputError, match="'flash' is unknown"):
    attention.check_implementation("flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(InputError, match="needs a GPU backend"):
      attention.check_implementation("cudnn")
  attention.check_implementation("dot")


def test_load_sets_the_kernel_on_the_decoder(tmp_path):
  from jaxmm import checkpoint
  m = _model("xla")
  checkpoint.save_model(tmp_path / "m", "llama", m.config.to_dict(), m.params)
  assert jaxmm.load(tmp_path / "m").config.attention == "xla"
  assert jaxmm.load(tmp_path / "m", attention="dot").config.attention == "dot"
  with pytest.raises(InputError, match="unknown"):
    jaxmm.load(tmp_path / "m", attention="flash")
  assert dataclasses.replace(m.config, attention="dot").to_dict()["attention"] == "dot"
