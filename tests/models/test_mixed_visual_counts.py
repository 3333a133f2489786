"""Padded visual capacity: prompts with one image, two images and none share one batch.

For the forward, generation and every pruning method (count and percentage keeps, one and two
stages), each example of the left-padded batch gives what it gives alone.
"""
import numpy as np
import pytest

from jaxmm import generation
from jaxmm.errors import InputError
from jaxmm.models import llava
from jaxmm.pruning import schedule as schedule_lib
from tiny_hf import IMAGE_TOKEN, tiny_llava

IMAGES = (1, 2, 0)   # images per example
SPECS = ["entropy@2:10", "fastv@1:20", "divprune@0:50%", "random@1:12", "fastv@2:25%",
         "divprune@0:20,random@2:25%", "entropy@1:60%,fastv@2:7"]


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = tiny_llava(seed=4)
  rng = np.random.default_rng(0)
  rows, pixels = [], []
  for i, n_img in enumerate(IMAGES):
    parts = [rng.integers(3, IMAGE_TOKEN, 2 + i)]
    for _ in range(n_img):
      parts += [np.full(cfg.num_image_tokens, IMAGE_TOKEN), rng.integers(3, IMAGE_TOKEN, 2)]
      pixels.append(rng.standard_normal((3, 28, 28)).astype(np.float32))
    parts.append(rng.integers(3, IMAGE_TOKEN, 3))
    rows.append(np.concatenate(parts).astype(np.int32))
  t = max(len(r) for r in rows)
  ids = np.zeros((len(rows), t), np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for b, r in enumerate(rows):
    ids[b, t - len(r):], mask[b, t - len(r):] = r, 1
  return cfg, params, ids, mask, np.stack(pixels), rows


def _alone(tiny, b):
  """(input_ids [1, T_b], pixel_values of example b or None)."""
  cfg, _, _, _, px, rows = tiny
  first = sum(IMAGES[:b])
  imgs = px[first:first + IMAGES[b]]
  return rows[b][None], (imgs if len(imgs) else None)


def _alone_spec(spec: str, n_visual: int) -> str | None:
  """The schedule example b runs alone: counts clipped to its own tokens (a count keeps
  min(k, n_b)); None when it has no visual tokens (nothing to prune)."""
  if n_visual == 0:
    return None
  stages, n = [], n_visual
  for st in schedule_lib.parse(spec):
    k = schedule_lib.keep_count(st.keep, n) if isinstance(st.keep, str) else min(st.keep, n)
    stages.append(f"{st.method}@{st.layer}:{st.keep if isinstance(st.keep, str) else k}")
    n = k
  return ",".join(stages)


def test_unpruned_forward_of_each_example_equals_it_alone(tiny):
  cfg, params, ids, mask, px, _ = tiny
  out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask).logits
  for b in range(len(IMAGES)):
    a_ids, a_px = _alone(tiny, b)
    alone = llava.forward(cfg, params, input_ids=a_ids, pixel_values=a_px).logits
    pad = ids.shape[1] - a_ids.shape[1]
    np.testing.assert_allclose(np.asarray(out)[b, pad:], np.asarray(alone)[0], atol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_pruned_forward_of_each_example_equals_it_alone(tiny, spec):
  cfg, params, ids, mask, px, _ = tiny
  out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                      schedule=spec, example_ids=[5, 6, 7])
  n_vis = [n * cfg.num_image_tokens for n in IMAGES]
  resolved = schedule_lib.resolve(schedule_lib.parse(spec), n_vis, cfg.text.num_layers,
                                  ids.shape[1])
  assert [k.shape[1] for k in out.kept] == [s.keep for s in resolved]   # the capacity
  for b in range(len(IMAGES)):
    a_ids, a_px = _alone(tiny, b)
    pad = ids.shape[1] - a_ids.shape[1]
    alone_spec = _alone_spec(spec, n_vis[b])
    alone = llava.forward(cfg, params, input_ids=a_ids, pixel_values=a_px,
                          schedule=alone_spec, example_ids=[5 + b])
    np.testing.assert_allclose(np.asarray(out.logits)[b, -1], np.asarray(alone.logits)[0, -1],
                               atol=1e-4)
    for i, kb in enumerate(out.kept):   # the same picks, -1 padded to the capacity
      kb = np.asarray(kb)[b]
      want = (np.asarray(alone.kept[i])[0] + pad) if alone_spec else np.zeros(0, int)
      np.testing.assert_array_equal(kb[kb >= 0], want)
      assert np.all(kb[len(want):] == -1)


@pytest.mark.parametrize("spec", [None, "entropy@2:10", "divprune@0:50%",
                                  "divprune@0:20,random@2:25%"])
def test_generation_of_each_example_equals_it_alone(tiny, spec):
  cfg, params, ids, mask, px, _ = tiny
  got = generation.generate(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                            max_new_tokens=6, schedule=spec, example_ids=[5, 6, 7])
  for b in range(len(IMAGES)):
    a_ids, a_px = _alone(tiny, b)
    n_vis = IMAGES[b] * cfg.num_image_tokens
    alone = generation.generate(cfg, params, input_ids=a_ids, pixel_values=a_px,
                                max_new_tokens=6, example_ids=[5 + b],
                                schedule=spec and _alone_spec(spec, n_vis))
    n = alone.shape[1]
    np.testing.assert_array_equal(got[b, :n], alone[0])


def test_a_count_above_every_example_is_refused(tiny):
  cfg, params, ids, mask, px, _ = tiny
  with pytest.raises(InputError, match="only 32 enter"):
    llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                  schedule="entropy@2:33")
