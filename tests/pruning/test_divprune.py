"""DivPrune picks against a brute-force NumPy version of pruning.md §5."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings, strategies as st

from jaxmm.pruning import divprune

N, D = 40, 24


def reference_picks(x_NxD, k):
  """Greedy max-min on cosine distance, recomputing the min over the selected set every step.
  Returns (picks, the smallest gap between the best and the runner-up over the steps)."""
  x = np.asarray(x_NxD, np.float64)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  dist = 1 - xn @ xn.T
  n = len(x)
  values = [min(dist[i, j] for j in range(n) if j != i) for i in range(n)]
  picks, gaps = [], []
  for _ in range(k):
    if picks:
      values = [-np.inf if i in picks else min(dist[s, i] for s in picks) for i in range(n)]
    order = np.argsort(values)[::-1]
    gaps.append(values[order[0]] - values[order[1]])
    picks.append(int(np.argmax(values)))
  return picks, min(gaps)


greedy = jax.jit(divprune.greedy_order, static_argnums=2)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 7, 20]))
def test_picks_equal_brute_force_reference(seed, k):
  rng = np.random.default_rng(seed)
  # A few clusters, so that distances are far from uniform.
  x = rng.standard_normal((5, D))[rng.integers(0, 5, N)] + 0.7 * rng.standard_normal((N, D))
  cand = rng.random(N) < 0.8
  cand[:k + 1] = True   # enough candidates
  idx = np.flatnonzero(cand)
  want, gap = reference_picks(x[idx], k)
  assume(gap > 1e-5)   # picks are only defined up to near-ties at fp32 precision
  order = np.asarray(greedy(jnp.asarray(x, jnp.float32), jnp.asarray(cand), k))
  picked = np.flatnonzero(order < k)
  got = picked[np.argsort(order[picked])]
  np.testing.assert_array_equal(got, idx[want])
  assert np.all(order[~cand] == k)


def test_score_ranks_picks_first_and_masks_text():
  from jaxmm.pruning.state import TokenState
  rng = np.random.default_rng(1)   # a seed whose picks have no near-tie (gap 0.022)
  x = jnp.asarray(rng.standard_normal((12, D)), jnp.float32)
  visual = jnp.asarray(np.arange(12) >= 2) & jnp.asarray(np.arange(12) < 10)
  s1 = TokenState(hidden=x, positions=jnp.arange(12), valid=jnp.ones(12, bool), visual=visual,
                  origin=jnp.arange(12))
  s = np.asarray(divprune.score(s1, {}, None, 3))
  want, gap = reference_picks(np.asarray(x)[2:10], 3)   # the brute force on the visual tokens
  assert gap > 1e-5
  assert np.all(np.isneginf(s[~np.asarray(visual)]))
  np.testing.assert_array_equal(np.argsort(-s)[:3], np.asarray(want) + 2)
  assert sorted(s[np.asarray(visual)])[:-3] == [0.0] * 5 and sorted(s)[-3:] == [1.0, 2.0, 3.0]


def test_duplicates_still_give_k_distinct_picks():
  x = jnp.asarray(np.repeat(np.random.default_rng(1).standard_normal((3, D)), 4, axis=0), jnp.float32)
  order = np.asarray(greedy(x, jnp.ones(12, bool), 6))
  assert sorted(order[order < 6].tolist()) == list(range(6))
