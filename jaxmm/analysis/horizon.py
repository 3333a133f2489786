"""Information horizon (pruning.md §4.1): how much one 2x2 window of visual tokens, alone, still
tells the model at layer l.

  I_l(w) = p_l(y* | text, w) - p_l(y* | text, ∅)

p_l(y* | text, S): the hidden states entering layer l (from one full captured forward, so layers
< l saw the whole image) are gathered to the text tokens plus the visual tokens S, positions
preserved; layers l..L-1, the final norm and the LM head run at the last prompt position only,
and p is the softmax probability of the first answer token y*. All windows and the empty set run
as one batch of static length n_text + 4 (the empty set's 4 extra slots are masked).

The horizon is ℓ_H = min{l >= 1 : mean_w |I_l(w)| <= τ · mean_w |I_1(w)|}, τ = 0.05 by default.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.models import segments
from jaxmm.pruning.state import TokenState

TAU = 0.05


def windows(grid: int) -> np.ndarray:
  """i32[W, 4]: raster indices (row * grid + col) of the 2x2 windows of a grid x grid image.
  W = (grid // 2)^2; with an odd grid the last row and column belong to no window."""
  r, c = np.meshgrid(np.arange(0, grid - 1, 2), np.arange(0, grid - 1, 2), indexing="ij")
  top = (r * grid + c).reshape(-1)
  return np.stack([top, top + 1, top + grid, top + grid + 1], axis=1).astype(np.int32)


def gather_sets(valid_T, visual_T, grid: int):
  """(idx i32[W+1, n], keep bool[W+1, n]) with n = T - grid^2 + 4: per window (the last row is
  the empty set) the slots of the text tokens and the window's tokens, ascending, masked slots
  first. The last slot is the last valid position of the prompt."""
  t = valid_T.shape[0]
  vis_idx = jnp.nonzero(visual_T, size=grid * grid)[0]
  win = vis_idx[jnp.asarray(windows(grid))]                       # i32[W, 4] sequence slots
  in_win = jnp.zeros((win.shape[0], t), bool).at[jnp.arange(win.shape[0])[:, None], win].set(True)
  text = valid_T & ~visual_T
  keep = jnp.concatenate([text[None] | (in_win & valid_T), text[None]], axis=0)
  n = t - grid * grid + 4
  key = jnp.where(keep, jnp.arange(t), -1)
  idx = jnp.argsort(key, axis=-1, stable=True)[:, t - n:]
  return idx, jnp.take_along_axis(keep, idx, axis=-1)


@functools.partial(jax.jit, static_argnames=("dec", "layer", "grid"))
def window_probs(dec, dparams, h_TxD, positions_T, valid_T, visual_T, target, layer: int,
                 grid: int):
  """f32[W+1]: p_layer(y* | text, w) for each window w, then for the empty set.

  h_TxD: hidden states entering `layer` of one example; positions i32[T]; valid bool[T];
  visual bool[T]: the grid^2 image-placeholder slots in raster order (masked ones included, so
  the windows keep their place; a masked token stays unseen); target: the id y*.
  dec, dparams: the decoder (`models.decoder`) and its params (`core.decoder_of`)."""
  idx, keep = gather_sets(valid_T, visual_T, grid)
  state = TokenState(hidden=h_TxD[idx], positions=positions_T[idx], valid=keep,
                     visual=visual_T[idx] & keep, origin=idx.astype(jnp.int32))
  seg, _ = segments.run_range(dec, dparams, state, layer, dec.num_layers)
  logits = dec.logits(dparams, seg.state.hidden[:, -1:])[:, 0]
  return jax.nn.softmax(logits, axis=-1)[:, target]


def information(dec, dparams, hidden_Lp1xTxD, positions_T, valid_T, visual_T, target,
                grid: int, layers) -> np.ndarray:
  """f32[len(layers), W]: I_l(w) for each probe layer l (hidden: the captured stack, entry l
  entering layer l). One jitted batch over all windows per layer."""
  out = []
  for l in layers:
    p = window_probs(dec, dparams, hidden_Lp1xTxD[l], positions_T, valid_T, visual_T,
                     jnp.int32(target), int(l), grid)
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
