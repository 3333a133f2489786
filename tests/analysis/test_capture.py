"""Opt-in capture: identical logits, correct stacks, nothing captured (or compiled) when off."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmm.analysis.capture import Capture
from jaxmm.errors import InputError
from jaxmm.models import core, llama, llava
from jaxmm.models.outputs import CausalLMOutput
from tiny_hf import hf_positions, llava_batch, tiny_llava


@pytest.fixture(scope="module")
def tiny():
  model, cfg, params = tiny_llava(seed=3)
  ids, mask, px = llava_batch(cfg, seed=1, pad=(0, 2))
  return model, cfg, params, ids, mask, px


def test_capture_on_off_same_logits_and_stacks(tiny):
  model, cfg, params, ids, mask, px = tiny
  kw = dict(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=hf_positions(mask))
  off = llava.forward(cfg, params, **kw)
  on = llava.forward(cfg, params, capture=Capture(hidden=True, queries=True), **kw)
  assert off.captured is None
  np.testing.assert_array_equal(np.asarray(on.logits), np.asarray(off.logits))
  n_l, (b, t) = cfg.text.num_layers, ids.shape
  cap = on.captured
  assert cap["hidden"].shape == (n_l + 1, b, t, cfg.text.hidden_size)
  assert cap["queries"].shape == (n_l, b, t, cfg.text.num_heads, cfg.text.head_dim)
  np.testing.assert_array_equal(np.asarray(cap["visual"]), (ids == cfg.image_token_id) & (mask == 1))
  with torch.no_grad():
    hf = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
               attention_mask=torch.tensor(mask), position_ids=torch.tensor(hf_positions(mask)),
               output_hidden_states=True)
  valid = mask.astype(bool)
  for l in range(n_l):  # transformers' last entry has the final norm applied; ours does not
    ref = hf.hidden_states[l].numpy()
    assert np.abs(np.asarray(cap["hidden"][l]) - ref)[valid].max() <= 1e-4, l
  # queries of layer l = q-projection of the attention-normed hidden state entering layer l
  for l in range(n_l):
    p = jax.tree.map(lambda a: a[l], params["llm"]["layers"])
    hn = llama.RMSNorm(cfg.text.rms_norm_eps).apply({"params": p["attn_norm"]}, cap["hidden"][l])
    q = (hn @ p["attn"]["q"]["kernel"]).reshape(b, t, cfg.text.num_heads, -1)
    np.testing.assert_allclose(np.asarray(cap["queries"][l]), np.asarray(q), atol=1e-5)
  only_q = llava.forward(cfg, params, capture=Capture(queries=True), **kw).captured
  assert set(only_q) == {"queries", "visual"}


def test_capture_with_schedule_is_rejected(tiny):
  _, cfg, params, ids, mask, px = tiny
  with pytest.raises(InputError):
    llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                  schedule="random@1:4", capture=Capture(hidden=True))


def _hlo(lowered) -> str:
  """StableHLO text without the module name and location metadata."""
  text = re.sub(r"loc\(.*?\)", "", lowered.as_text())
  return re.sub(r"module @\S+", "module", text)


def test_capture_off_compiles_the_plain_forward(tiny):
  _, cfg, params, ids, mask, px = tiny
  ids_, mask_ = jnp.asarray(ids), jnp.asarray(mask, bool)
  pos, keys = jnp.asarray(hf_positions(mask)), jax.random.split(jax.random.PRNGKey(0), 2)
  arrays = {"input_ids": ids_, "pixel_values": jnp.asarray(px), "attention_mask": mask_,
            "position_ids": pos}

  def plain(params, arrays, keys):  # the forward before capture
    x = llava.input_embeddings(cfg, params, arrays["input_ids"], arrays["pixel_values"])
    return CausalLMOutput(logits=llama.decode_embeds(cfg.text, params["llm"], x,
                                                     arrays["attention_mask"],
                                                     arrays["position_ids"]))

  args = (params, arrays, keys)
  off = core._forward.lower("llava", cfg, *args, ())
  want = jax.jit(plain).lower(*args)
  assert _hlo(off) == _hlo(want)
  on = core._forward.lower("llava", cfg, *args, (), Capture(hidden=True))
  assert _hlo(on) != _hlo(want)
  # the capture-off output pytree holds only the logits
  out = core._forward("llava", cfg, *args, ())
  assert [x.shape for x in jax.tree.leaves(out)] == [(2, ids.shape[1], cfg.text.vocab_size)]
