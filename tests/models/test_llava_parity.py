"""LLaVA-1.5 port vs transformers' LlavaForConditionalGeneration (the oracle), fp32."""
import jax
import numpy as np
import pytest
import torch

from jaxmm import generation
from jaxmm.errors import InputError
from jaxmm.models import llava
from tiny_hf import hf_positions, llava_batch, tiny_llava

CASES = [  # (gqa, vision_feature_layer, strategy)
    (True, -2, "default"), (False, -2, "default"), (True, -1, "full"),
    (False, -1, "default"), (True, -2, "full"), (True, [-2, -1], "default")]


def _hf_logits(model, ids, mask, px):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                 attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(hf_positions(mask))).logits.numpy()


@pytest.mark.parametrize("gqa,layer,strategy", CASES)
def test_logits_match_transformers(gqa, layer, strategy):
  model, cfg, params = tiny_llava(gqa=gqa, feature_layer=layer, strategy=strategy)
  ids, mask, px = llava_batch(cfg)
  ref = _hf_logits(model, ids, mask, px)
  out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask)
  valid = mask.astype(bool)
  assert out.logits.shape == ref.shape
  assert np.abs(np.asarray(out.logits) - ref)[valid].max() <= 1e-4


def test_logits_match_without_jit():
  model, cfg, params = tiny_llava(gqa=True)
  ids, mask, px = llava_batch(cfg)
  with jax.disable_jit():
    out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask)
  ref = _hf_logits(model, ids, mask, px)
  assert np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max() <= 1e-4


def test_batch_equals_single_examples():
  _, cfg, params = tiny_llava()
  ids, mask, px = llava_batch(cfg, pad=(0, 3))
  both = np.asarray(llava.forward(cfg, params, input_ids=ids, pixel_values=px,
                                  attention_mask=mask).logits)
  one = np.asarray(llava.forward(cfg, params, input_ids=ids[1:, 3:], pixel_values=px[1:]).logits)
  np.testing.assert_allclose(both[1, 3:], one[0], atol=1e-5)


@pytest.mark.parametrize("gqa", [True, False])
def test_greedy_generation_matches_transformers(gqa):
  model, cfg, params = tiny_llava(gqa=gqa, seed=1)
  ids, mask, px = llava_batch(cfg, seed=3)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                         attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False)
  ref = ref[:, ids.shape[1]:].numpy()
  ours = generation.generate(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                             max_new_tokens=10)
  np.testing.assert_array_equal(ours, ref)


def test_decode_compiles_once():
  _, cfg, params = tiny_llava()
  ids, mask, px = llava_batch(cfg)
  generation._decode.clear_cache()
  a = generation.generate(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                          max_new_tokens=6)
  b = generation.generate(cfg, params, input_ids=ids, pixel_values=px * 0.5, attention_mask=mask,
                          max_new_tokens=6)
  assert a.shape[0] == b.shape[0] == 2
  assert generation._decode._cache_size() == 1


def test_bad_inputs_name_the_problem():
  _, cfg, params = tiny_llava()
  ids, mask, px = llava_batch(cfg)
  with pytest.raises(InputError, match="pixel_values must be"):
    llava.forward(cfg, params, input_ids=ids, pixel_values=px[:, :, :20], attention_mask=mask)
  with pytest.raises(InputError, match="image tokens"):
    llava.forward(cfg, params, input_ids=ids[:, 5:], pixel_values=px, attention_mask=mask[:, 5:])
  with pytest.raises(InputError, match="empty"):
    llava.forward(cfg, params, input_ids=np.zeros((1, 0), np.int32))
  with pytest.raises(InputError, match="left padding"):
    generation.generate(cfg, params, input_ids=ids, pixel_values=px,
                        attention_mask=mask[:, ::-1].copy(), max_new_tokens=2)


def test_bfloat16_load_and_forward(tmp_path):
  """A bfloat16 conversion computes in bfloat16 and stays close to the fp32 logits."""
  import jaxmm
  from jaxmm.converters.cli import convert_folder
  model, cfg, params = tiny_llava()
  model.save_pretrained(tmp_path / "hf")
  convert_folder(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
  m = jaxmm.load(tmp_path / "bf16")
  assert m.config.text.dtype == "bfloat16"
  ids, mask, px = llava_batch(cfg)
  lo = np.asarray(jaxmm.forward(m, input_ids=ids, pixel_values=px, attention_mask=mask).logits)
  hi = _hf_logits(model, ids, mask, px)
  valid = mask.astype(bool)
  assert lo.dtype == np.float32 and np.isfinite(lo).all()
  assert np.abs(lo - hi)[valid].max() <= 0.05 * np.abs(hi)[valid].max()
