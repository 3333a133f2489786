"""Qwen2-VL / Qwen2.5-VL ports vs transformers (the oracle) on tiny random models, fp32."""
import dataclasses

import jax
import numpy as np
import pytest
import torch

import jaxmm
from jaxmm import generation
from jaxmm.models import core, qwen2_vl
from jaxmm.models import qwen2_vl_vision as vision
from qwen_tiny import batch, hf_logits, hf_text_positions, tiny_qwen, torch_inputs

TYPES = ["qwen2_vl", "qwen2_5_vl"]
# Two images of different grids (6 and 15 visual tokens; 15 = 5 x 3 merge units, so Qwen2.5's
# 2 x 2-unit windows are padded at the edges), left padded.
MIXED = [[("image", (1, 4, 6))], [("image", (1, 10, 6))]]
# A video of 3 temporal patches, then an image and a 2-patch video in one prompt.
VIDEOS = [[("video", (3, 4, 4))], [("image", (1, 4, 4)), ("video", (2, 6, 4))]]


@pytest.fixture(scope="module", params=TYPES)
def tiny(request):
  return tiny_qwen(request.param, seed=1)


def _model(cfg, params):
  return jaxmm.Model("qwen2_vl", cfg, params)


def _check(model, cfg, params, inputs, hf_extra=None):
  ref = hf_logits(model, {**inputs, **(hf_extra or {})})
  out = jaxmm.forward(_model(cfg, params), **inputs)
  valid = inputs["attention_mask"].astype(bool)
  assert out.logits.shape == ref.shape
  assert np.abs(np.asarray(out.logits) - ref)[valid].max() <= 1e-4


def test_mixed_grids_left_padded_match_transformers(tiny):
  _check(*tiny, batch(MIXED, seed=2))


def test_without_jit_matches_transformers(tiny):
  model, cfg, params = tiny
  inputs = batch(MIXED, seed=3)
  ref = hf_logits(model, inputs)
  with jax.disable_jit():
    out = qwen2_vl.forward(cfg, params, **inputs)
  assert np.abs(np.asarray(out.logits) - ref)[inputs["attention_mask"].astype(bool)].max() <= 1e-4


def test_videos_mixed_with_images_match_transformers(tiny):
  model, cfg, params = tiny
  inputs = batch(VIDEOS, seed=4, prefix=(5, 2))
  if cfg.model_type == "qwen2_5_vl":   # fractional spacings: float32 truncation as torch
    inputs["second_per_grid_ts"] = np.asarray([0.75, 1.3], np.float32)
  _check(model, cfg, params, inputs)


def test_text_only_prompt_matches_transformers(tiny):
  model, cfg, params = tiny
  inputs = batch([[], []], seed=5, prefix=(6, 3))
  pos = hf_text_positions(inputs["attention_mask"])   # what transformers' generate uses
  _check(model, cfg, params, inputs, {"position_ids": pos})


def test_rope_index_equals_transformers(tiny):
  model, cfg, params = tiny
  inputs = batch(VIDEOS + MIXED, seed=6, prefix=(1, 4, 2, 3))
  seconds = np.asarray([0.5, 1.7], np.float32)
  grids = {1: inputs["image_grid_thw"], 2: inputs["video_grid_thw"]}
  extra = {"second_per_grid_ts": torch.tensor(seconds)} if cfg.model_type == "qwen2_5_vl" else {}
  t = torch_inputs(inputs)
  ref, ref_d = model.model.get_rope_index(
      t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"], t["video_grid_thw"],
      attention_mask=t["attention_mask"], **extra)
  types = qwen2_vl.token_types(cfg, inputs["input_ids"], inputs["attention_mask"], None)
  pos, d = qwen2_vl.rope_index(cfg, types, inputs["attention_mask"], grids,
                               seconds if extra else None)
  np.testing.assert_array_equal(pos, np.moveaxis(ref.numpy(), 0, -1))
  np.testing.assert_array_equal(d, ref_d.numpy()[:, 0])
  given = qwen2_vl.prepare(cfg, {**inputs, "position_ids": ref.numpy(),
                                 "second_per_grid_ts": seconds if extra else None})
  np.testing.assert_array_equal(np.asarray(given.arrays["position_ids"]), pos)
  # Decoding continues at the last prompt position + 1 on every axis (transformers' generate);
  # for prompts ending in text after images that is the rope-delta position max + 1.
  n_valid = inputs["attention_mask"].sum(axis=1)
  for b in (2, 3):
    np.testing.assert_array_equal(pos[b, -1] + 1, d[b] + n_valid[b])


def test_vision_tower_equals_transformers(tiny):
  """Merged features of a packed batch of images and videos (windows exercised for 2.5)."""
  model, cfg, params = tiny
  inputs = batch(MIXED + VIDEOS, seed=7)
  arrays = qwen2_vl.prepare(cfg, inputs).arrays
  grid = np.concatenate([inputs["image_grid_thw"], inputs["video_grid_thw"]])
  px = np.concatenate([inputs["pixel_values"], inputs["pixel_values_videos"]])
  with torch.no_grad():
    ref = model.model.visual(torch.tensor(px), grid_thw=torch.tensor(grid)).pooler_output.numpy()
  feats = np.asarray(vision.tower(cfg.vision, params["vision"], arrays["patches"], arrays))
  assert feats.shape[0] == arrays["patches"].shape[0] // 4 >= ref.shape[0]
  assert np.abs(feats[:len(ref)] - ref).max() <= 1e-5
  if cfg.model_type == "qwen2_5_vl":   # the windows matter: full attention everywhere differs
    full = dataclasses.replace(cfg.vision, fullatt_block_indexes=tuple(range(cfg.vision.depth)))
    other = np.asarray(vision.tower(full, params["vision"], arrays["patches"], arrays))
    assert np.abs(other[:len(ref)] - ref).max() > 1e-3


def test_window_layout_is_a_permutation_with_its_inverse():
  _, cfg, _ = tiny_qwen("qwen2_5_vl")
  lay = vision.layout(cfg.vision, np.asarray([[1, 10, 6], [2, 6, 4]]))
  order, rev = lay["window_index"], lay["window_reverse"]
  assert sorted(order.tolist()) == list(range(len(order)))
  np.testing.assert_array_equal(order[rev], np.arange(len(order)))
  assert len(lay["vision_pos"]) == vision.bucket(60 + 48) == 128


@pytest.mark.parametrize("model_type", TYPES)
def test_greedy_generation_matches_transformers(model_type):
  model, cfg, params = tiny_qwen(model_type, seed=3)
  inputs = batch([[("image", (1, 4, 6))], [("image", (1, 6, 8))]], seed=8)
  with torch.no_grad():
    ref = model.generate(**torch_inputs(inputs), max_new_tokens=8, do_sample=False)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  ours = generation.generate(cfg, params, max_new_tokens=8, **inputs)
  np.testing.assert_array_equal(ours, ref)


def test_two_image_sizes_in_one_bucket_compile_once():
  """24 and 28 patches share the 32-patch bucket; prompts padded to one length."""
  _, cfg, params = tiny_qwen("qwen2_5_vl")
  a = batch([[("image", (1, 4, 6))], []], seed=9, length=20)
  b = batch([[("image", (1, 2, 14))], []], seed=9, length=20)
  assert a["input_ids"].shape == b["input_ids"].shape
  qwen2_vl.forward(cfg, params, **a)
  size = core._forward._cache_size()
  out = qwen2_vl.forward(cfg, params, **b)
  assert core._forward._cache_size() == size
  assert np.isfinite(np.asarray(out.logits)).all()


def test_generation_after_a_video_continues_like_generate():
  """A video whose frame positions (interval 2 s x 2 tokens/s) outrun the text after it: the
  rope-delta position (max + 1) and generate's (last + 1) differ; jaxmm follows generate."""
  model, cfg, params = tiny_qwen("qwen2_5_vl", seed=3)
  inputs = batch([[("video", (4, 4, 4))], [("image", (1, 4, 4))]], seed=3)
  inputs["second_per_grid_ts"] = np.asarray([2.0], np.float32)
  types = qwen2_vl.token_types(cfg, inputs["input_ids"], inputs["attention_mask"], None)
  grids = {1: inputs["image_grid_thw"], 2: inputs["video_grid_thw"]}
  pos, d = qwen2_vl.rope_index(cfg, types, inputs["attention_mask"], grids,
                               inputs["second_per_grid_ts"])
  assert pos[0, -1, 0] + 1 < d[0] + inputs["attention_mask"][0].sum()
  with torch.no_grad():
    ref = model.generate(**torch_inputs(inputs), max_new_tokens=8, do_sample=False)
  ours = generation.generate(cfg, params, max_new_tokens=8, **inputs)
  np.testing.assert_array_equal(ours, ref[:, inputs["input_ids"].shape[1]:].numpy())
