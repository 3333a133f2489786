"""Inputs that would silently compute something else are refused (or handled) on the host:
out-of-vocabulary ids, non-finite pixels, and FastV on right-padded prompts."""
import dataclasses

import numpy as np
import pytest

from jaxmm import generation
from jaxmm.errors import InputError
from jaxmm.models import llama, llava
from tiny_hf import llava_batch, tiny_llava


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = tiny_llava(seed=6)
  ids, mask, px = llava_batch(cfg, seed=2, pad=(0, 3))
  return cfg, params, ids, mask, px


@pytest.mark.parametrize("bad", [-1, 120, 10_000])
def test_out_of_vocabulary_ids_are_refused_naming_the_id(tiny, bad):
  cfg, params, ids, mask, px = tiny
  ids = ids.copy()
  ids[0, -2] = bad
  kw = dict(input_ids=ids, pixel_values=px, attention_mask=mask)
  with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary \[0, 120\)"):
    llava.forward(cfg, params, **kw)
  with pytest.raises(InputError, match=f"token id {bad}"):
    generation.generate(cfg, params, max_new_tokens=2, **kw)
  with pytest.raises(InputError, match=f"token id {bad}"):
    llama.forward(cfg.text, params["llm"], input_ids=ids[:, -3:])


def test_the_image_placeholder_may_lie_outside_the_vocabulary():
  """An added `<image>` token (SmolLM2's) has the id vocab_size: it is replaced, never embedded."""
  _, cfg, params = tiny_llava(seed=6)
  cfg = dataclasses.replace(cfg, image_token_id=cfg.text.vocab_size)
  ids, mask, px = llava_batch(cfg, seed=2, pad=(0, 3))
  ids[ids == 100] = cfg.text.vocab_size
  assert np.isfinite(np.asarray(llava.forward(cfg, params, input_ids=ids, pixel_values=px,
                                              attention_mask=mask).logits)).all()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels_are_refused(tiny, value):
  cfg, params, ids, mask, px = tiny
  px = px.copy()
  px[1, 0, 3, 4] = value
  with pytest.raises(InputError, match="pixel_values holds 1 NaN/inf"):
    llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask)


def test_fastv_ranks_by_the_last_valid_token_with_either_padding(tiny):
  """A right-padded prompt prunes as the same prompt left padded: FastV reads the attention
  row of the last valid prompt token, not of a padding slot."""
  cfg, params, ids, mask, px = tiny
  pad = int((mask[1] == 0).sum())
  right_ids = np.concatenate([ids[1:, pad:], np.zeros((1, pad), ids.dtype)], axis=1)
  right_mask = np.concatenate([mask[1:, pad:], np.zeros((1, pad), mask.dtype)], axis=1)
  for spec in ("fastv@1:5", "fastv@2:50%"):
    left = llava.forward(cfg, params, input_ids=ids[1:], pixel_values=px[1:],
                         attention_mask=mask[1:], schedule=spec)
    right = llava.forward(cfg, params, input_ids=right_ids, pixel_values=px[1:],
                          attention_mask=right_mask, schedule=spec)
    np.testing.assert_array_equal(np.asarray(left.kept[0]) - pad, np.asarray(right.kept[0]))
