"""Random pruning (pruning.md §4.2): keep a uniform sample of the visual tokens, w/o replacement.

The top-k of iid uniform scores is a uniform k-subset. Each token's uniform is drawn from
fold_in(key, its rank among the visual tokens of the unpruned sequence), so the sample depends
only on the example's key and its visual tokens, not on padding, prefix length, earlier stages'
survivors' slots or the other examples of the batch. `select.apply_stage` explains the keys.
"""
import jax
import jax.numpy as jnp

from jaxmm.pruning.state import TokenState

NEEDS = frozenset()


def visual_rank(state_1: TokenState):
  """i32[N]: for visual slots, the token's index among the unpruned sequence's visual tokens.

  Non-visual slots of the unpruned sequence (text, padding) are never dropped and order is
  preserved, so the number of them before a slot is the same as in the unpruned sequence;
  subtracting it from the slot's origin leaves the number of visual tokens before it there.
  Filler slots of a ragged batch (origin -1) are not of the unpruned sequence and do not count.
  """
  nonvis = (~state_1.visual & (state_1.origin >= 0)).astype(jnp.int32)
  return state_1.origin - (jnp.cumsum(nonvis) - nonvis)


def score(state_1: TokenState, aux_1: dict, key, k: int):
  """f32[N] iid uniforms in [0, 1) on visual slots, -inf elsewhere."""
  del aux_1, k
  u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r)))(visual_rank(state_1))
  return jnp.where(state_1.visual & state_1.valid, u, -jnp.inf)
