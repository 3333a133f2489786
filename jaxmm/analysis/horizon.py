"""Information horizon (pruning.md §4.1): how much one 2x2 window of visual tokens, alone, still
tells the model at layer l.

  I_l(w) = p_l(y* | text, w) - p_l(y* | text, ∅)

p_l(y* | text, S): the hidden states entering layer l (from one full captured forward, so layers
< l saw the whole image) are gathered to the text tokens plus the visual tokens S, positions
preserved (one id or an M-RoPE triple per token); layers l..L-1, the final norm and the LM head
run at the last prompt position only, and p is the softmax probability of the first answer
token y*. All windows and the empty set run as one batch of static length n_text + 4.

Windows follow each image's own grids (the family's `visual_grids`: LLaVA's square patch grid,
LLaVA-NeXT's base grid and unpadded tile grid, Qwen2-VL's merged grid (h/2, w/2) per image or
video frame): the 2x2 blocks of a grid in raster order. A grid's odd last row or column, and
visual tokens in no grid (LLaVA-NeXT's newlines), belong to no window.

The horizon is ℓ_H = min{l >= 1 : mean_w |I_l(w)| <= τ · mean_w |I_1(w)|}, τ = 0.05 by default.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.models import segments
from jaxmm.pruning.state import TokenState

TAU = 0.05


def grid_windows(grid_RxC) -> np.ndarray:
  """i32[W, 4]: the entries (top-left, top-right, bottom-left, bottom-right) of the 2x2 blocks
  of a rows x cols array, in raster order; W = (rows // 2) * (cols // 2)."""
  g = np.asarray(grid_RxC)
  r, c = (g.shape[0] // 2) * 2, (g.shape[1] // 2) * 2
  b = g[:r, :c].reshape(r // 2, 2, c // 2, 2).transpose(0, 2, 1, 3)
  return b.reshape(-1, 4).astype(np.int32)


def windows(grid: int) -> np.ndarray:
  """i32[W, 4]: raster indices (row * grid + col) of the 2x2 windows of a grid x grid image.
  W = (grid // 2)^2; with an odd grid the last row and column belong to no window."""
  return grid_windows(np.arange(grid * grid).reshape(grid, grid))


def image_windows(grids) -> np.ndarray:
  """i32[W, 4]: the windows of all of an example's grids (i32[rows, cols] sequence slots, the
  family's `visual_grids`), grid after grid."""
  return np.concatenate([grid_windows(g) for g in grids] or [np.zeros((0, 4))]).astype(np.int32)


def window_sets(valid_T, visual_T, windows_Wx4):
  """(idx i32[W+1, n], keep bool[W+1, n]) with n = T - (visual slots) + 4: per window (the last
  row is the empty set) the slots of the text tokens and the window's tokens, ascending, masked
  slots first, so the last slot is the last valid position of the prompt. windows_Wx4: sequence
  slots of visual tokens."""
  valid, visual = np.asarray(valid_T, bool), np.asarray(visual_T, bool)
  wins = np.asarray(windows_Wx4, np.int64).reshape(-1, 4)
  t, n_w = valid.shape[0], wins.shape[0]
  text = valid & ~visual
  keep = np.repeat(text[None], n_w + 1, axis=0)
  keep[np.arange(n_w)[:, None], wins] |= valid[wins]
  n = t - int(visual.sum()) + 4
  key = np.where(keep, np.arange(t), -1)
  idx = np.argsort(key, axis=-1, kind="stable")[:, t - n:]
  return idx.astype(np.int32), np.take_along_axis(keep, idx, axis=-1)


@functools.partial(jax.jit, static_argnames=("dec", "layer"))
def window_probs(dec, dparams, h_TxD, positions_T, visual_T, idx, keep, target, layer: int):
  """f32[W+1]: p_layer(y* | text, w) for each window w, then for the empty set.

  h_TxD: hidden states entering `layer` of one example; positions i32[T] (or [T, 3]); visual
  bool[T]; (idx, keep): `window_sets`; target: the id y*. dec, dparams: the decoder
  (`models.decoder`) and its params (`core.decoder_of`)."""
  state = TokenState(hidden=h_TxD[idx], positions=positions_T[idx], valid=keep,
                     visual=visual_T[idx] & keep, origin=idx.astype(jnp.int32))
  seg, _ = segments.run_range(dec, dparams, state, layer, dec.num_layers)
  logits = dec.logits(dparams, seg.state.hidden[:, -1:])[:, 0]
  return jax.nn.softmax(logits, axis=-1)[:, target]


def information(dec, dparams, hidden_Lp1xTxD, positions_T, valid_T, visual_T, target,
                windows_Wx4, layers) -> np.ndarray:
  """f32[len(layers), W]: I_l(w) for each probe layer l (hidden: the captured stack, entry l
  entering layer l; windows_Wx4: sequence slots, `image_windows`). One jitted batch over all
  windows per layer."""
  idx, keep = window_sets(valid_T, visual_T, windows_Wx4)
  idx, keep, visual = jnp.asarray(idx), jnp.asarray(keep), jnp.asarray(visual_T, bool)
  out = []
  for l in layers:
    p = window_probs(dec, dparams, hidden_Lp1xTxD[l], jnp.asarray(positions_T), visual, idx,
                     keep, jnp.int32(target), int(l))
    out.append(p[:-1] - p[-1])
  return np.asarray(jnp.stack(out))


def horizon_layer(layers, mean_abs, tau: float = TAU):
  """min{l >= 1 : mean_abs[l] <= tau * mean_abs[1]} over the probed `layers` (which must include
  layer 1), or None when the information never falls that low."""
  layers, mean_abs = list(layers), np.asarray(mean_abs, np.float64)
  ref = mean_abs[layers.index(1)]
  for l, v in zip(layers, mean_abs):
    if l >= 1 and v <= tau * ref:
      return int(l)
  return None
