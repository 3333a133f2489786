"""DivPrune (pruning.md §5): greedy max-min cosine diversity over the visual tokens.

Pick 0 is the token whose nearest other visual token is farthest; pick t is the token whose
minimum distance to the t already picked is largest (ties: lowest index). Distances are cosine
distances 1 - cos in float32, computed once; the loop carries each token's distance to the
picked set (min over picks, updated with the new pick's row), which equals recomputing it.
"""
import jax
import jax.numpy as jnp

from jaxmm.pruning.state import TokenState

NEEDS = frozenset()


def cosine_distance(x_NxD):
  """f32[N, N] = 1 - cos(x_i, x_j)."""
  x = x_NxD.astype(jnp.float32)
  xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return 1.0 - jnp.einsum("id,jd->ij", xn, xn)


def greedy_order(x_NxD, cand_N, k: int):
  """i32[N]: the pick step (0..k-1) of each picked candidate, k for the others.

  Picked tokens leave the pool (score -inf), so exactly min(k, #candidates) distinct tokens are
  picked even when distances tie at 0 (duplicate features), where the reference could re-pick.
  """
  n = x_NxD.shape[0]
  dist = cosine_distance(x_NxD)
  others = cand_N[None, :] & ~jnp.eye(n, dtype=bool)
  nearest = jnp.where(others, dist, jnp.inf).min(axis=1)   # the pick-0 rule

  def body(t, carry):
    to_picks, order = carry   # to_picks: each token's min distance to the tokens picked so far
    value = jnp.where(t == 0, nearest, to_picks)
    value = jnp.where(cand_N & (order == k), value, -jnp.inf)
    sel = jnp.argmax(value)   # first index among ties, as torch.argmax in the reference
    order = order.at[sel].set(jnp.where(value[sel] > -jnp.inf, t, order[sel]))
    return jnp.minimum(to_picks, dist[sel]), order

  init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.full((n,), k, jnp.int32))
  return jax.lax.fori_loop(0, k, body, init)[1]


def score(state_1: TokenState, aux_1: dict, key, k: int):
  """f32[N]: k - step for the k picks (first pick highest), 0 for the other visual tokens,
  -inf for non-visual slots. Uses the state's own hidden states (the projector outputs at
  layer 0)."""
  del aux_1, key
  cand = state_1.visual & state_1.valid
  order = greedy_order(state_1.hidden, cand, k)
  return jnp.where(cand, (k - order).astype(jnp.float32), -jnp.inf)
