"""Synthetic prompts for pruning tests: [left padding][prefix text][image][suffix text].

Every token's features (hidden row, layer-(K-1) queries, attention weight) are drawn from the
example's own seed, so an example has the same data alone and inside any padded batch.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxmm.inputs import positions_from_mask
from jaxmm.pruning.state import TokenState

D, H, DH = 16, 4, 8


@dataclasses.dataclass(frozen=True)
class Example:
  seed: int
  prefix: int
  n_visual: int
  suffix: int

  @property
  def length(self) -> int:
    return self.prefix + self.n_visual + self.suffix

  def features(self):
    """(hidden f32[T, D], queries f32[T, H, DH], attn_row f32[T], visual bool[T])."""
    rng = np.random.default_rng(self.seed)
    t = self.length
    hidden = rng.standard_normal((t, D)).astype(np.float32)
    queries = rng.standard_normal((t, H, DH)).astype(np.float32) * rng.uniform(0.5, 2, (t, 1, 1))
    attn = rng.dirichlet(np.ones(t)).astype(np.float32)
    visual = np.zeros(t, bool)
    visual[self.prefix:self.prefix + self.n_visual] = True
    return hidden, queries, attn.astype(np.float32), visual


def batch(examples, length=None, extra_slots=0):
  """(TokenState, aux) of left-padded examples; aux["attn_row"] has `extra_slots` decode slots."""
  length = length or max(e.length for e in examples)
  cols = [[], [], [], [], []]
  for e in examples:
    pad = length - e.length
    hidden, queries, attn, visual = e.features()
    for col, a in zip(cols, (hidden, queries, attn, visual, np.ones(e.length, bool))):
      col.append(np.concatenate([np.zeros((pad,) + a.shape[1:], a.dtype), a]))
  hidden, queries, attn, visual, valid = (np.stack(c) for c in cols)
  b = len(examples)
  attn = np.concatenate([attn, np.zeros((b, extra_slots), np.float32)], axis=1)
  state = TokenState(hidden=jnp.asarray(hidden), positions=positions_from_mask(jnp.asarray(valid)),
                     valid=jnp.asarray(valid), visual=jnp.asarray(visual),
                     origin=jnp.asarray(np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))))
  return state, {"queries": jnp.asarray(queries), "attn_row": jnp.asarray(attn)}


def aux_for(state: TokenState, full_aux: dict) -> dict:
  """The layer-(K-1) quantities of a (pruned) state's tokens, looked up by origin."""
  origin = np.asarray(state.origin)
  q = np.take_along_axis(np.asarray(full_aux["queries"]), origin[:, :, None, None], axis=1)
  a = np.take_along_axis(np.asarray(full_aux["attn_row"]), origin, axis=1)
  return {"queries": jnp.asarray(q), "attn_row": jnp.asarray(a)}
