"""Horizon metric on a tiny random LLaVA: exact against masked full forwards; an unseen window is 0."""
import jax
import numpy as np
import pytest

from jaxmm.analysis import horizon
from jaxmm.analysis.capture import Capture
from jaxmm.models import llama, llava
from tiny_hf import hf_positions, llava_batch, tiny_llava


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = tiny_llava(seed=4)
  ids, mask, px = llava_batch(cfg, seed=2, pad=(0,))
  return cfg, params, ids, mask, px


def _grid(cfg):
  g = int(round(cfg.num_image_tokens ** 0.5))
  assert g * g == cfg.num_image_tokens and g >= 4
  return g


def _captured(cfg, params, ids, mask, px):
  pos = hf_positions(mask)
  out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                      position_ids=pos, capture=Capture(hidden=True))
  return out, pos


def test_windows_cover_the_grid_in_raster_order():
  w = horizon.windows(4)
  np.testing.assert_array_equal(w, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
  assert horizon.windows(5).shape == (4, 4)
  # A rows x cols grid of slots: (rows // 2) * (cols // 2) windows; odd edges belong to none.
  g = 10 + np.arange(15).reshape(3, 5)
  np.testing.assert_array_equal(horizon.grid_windows(g), [[10, 11, 15, 16], [12, 13, 17, 18]])
  assert horizon.image_windows([g, np.arange(4).reshape(2, 2)]).shape == (3, 4)
  assert horizon.grid_windows(np.arange(3).reshape(1, 3)).shape == (0, 4)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_window_probs_match_masked_forward(tiny, layer):
  cfg, params, ids, mask, px = tiny
  grid = _grid(cfg)
  out, pos = _captured(cfg, params, ids, mask, px)
  cap = out.captured
  target = int(np.argmax(out.logits[0, -1]))
  vis = np.flatnonzero(np.asarray(cap["visual"][0]))
  wins = horizon.windows(grid)
  idx, keep = horizon.window_sets(mask[0].astype(bool), cap["visual"][0], vis[wins])
  p = np.asarray(horizon.window_probs(llava.decoder(cfg), params["llm"], cap["hidden"][layer][0],
                                      pos[0], cap["visual"][0], idx, keep, target, layer))
  # reference: the full-length sequence with the other visual slots masked, one row per window
  m = np.repeat(mask.astype(bool), len(wins) + 1, axis=0)
  m[:, vis] = False
  for w, win in enumerate(wins):
    m[w, vis[win]] = True
  slots = np.broadcast_to(np.arange(ids.shape[1]), m.shape)
  h0 = np.repeat(np.asarray(cap["hidden"][layer]), len(m), axis=0)
  h = llama.run_layers(cfg.text, params["llm"]["layers"], h0, np.repeat(pos, len(m), axis=0),
                       llama.attention_mask(slots, m), start=layer, end=cfg.text.num_layers).x
  ref = jax.nn.softmax(llama.lm_logits(cfg.text, params["llm"], h)[:, -1])[:, target]
  np.testing.assert_allclose(p, np.asarray(ref), rtol=0, atol=1e-6)
  if layer == 0:  # at the input this is the model's own forward on the masked prompt
    m = mask.copy()
    m[0, vis] = 0
    m[0, vis[wins[1]]] = 1
    full = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=m,
                         position_ids=pos).logits
    assert abs(p[1] - float(jax.nn.softmax(full[0, -1])[target])) <= 1e-6


def test_unseen_window_has_zero_information(tiny):
  cfg, params, ids, mask, px = tiny
  grid = _grid(cfg)
  vis = np.flatnonzero(ids[0] == cfg.image_token_id)
  unseen = vis[horizon.windows(grid)[0]]
  m = mask.copy()
  m[0, unseen] = 0        # window 0 is masked out in every layer: it cannot reach the output
  out, pos = _captured(cfg, params, ids, m, px)
  cap = out.captured
  target = int(np.argmax(out.logits[0, -1]))
  layers = range(cfg.text.num_layers)
  info = horizon.information(llava.decoder(cfg), params["llm"], cap["hidden"][:, 0], pos[0],
                             m[0].astype(bool), ids[0] == cfg.image_token_id, target,
                             vis[horizon.windows(grid)], layers)
  assert info.shape == (len(layers), (grid // 2) ** 2)
  assert np.abs(info[:, 0]).max() <= 1e-7
  assert np.abs(info[:, 1:]).min() > 1e-6


def test_horizon_rule():
  layers = [1, 2, 3, 4]
  assert horizon.horizon_layer(layers, [1.0, 0.5, 0.04, 0.0]) == 3
  assert horizon.horizon_layer(layers, [1.0, 0.5, 0.2, 0.1]) is None
  assert horizon.horizon_layer([0, *layers], [9.0, 1.0, 0.05, 0.01, 0.0]) == 2
