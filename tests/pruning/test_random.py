"""Random pruning: deterministic under a key, uniform over tokens, independent of the layout."""
import jax
import jax.numpy as jnp
import numpy as np

from prune_layouts import Example, batch
from jaxmm.pruning import random as random_method
from jaxmm.pruning import schedule, select

NV = 8
apply_jit = jax.jit(select.apply_stage, static_argnums=0)


def one(state):
  return jax.tree.map(lambda a: a[0], state)


def test_deterministic_under_a_fixed_key():
  state, aux = batch([Example(0, 3, NV, 2), Example(1, 1, NV, 4)])
  (stage,) = schedule.resolve(schedule.parse("random@0:3"), NV, 4)
  a = apply_jit(stage, state, aux, jax.random.key(5))
  b = apply_jit(stage, state, aux, jax.random.key(5))
  np.testing.assert_array_equal(a.origin, b.origin)
  others = {tuple(np.asarray(apply_jit(stage, state, aux, jax.random.key(s)).origin[0]))
            for s in range(6, 12)}
  assert len(others) > 1   # the key matters


def test_uniform_over_tokens_chi_square():
  """Keep k=2 of n=8 over M keys; count how often each token is kept.

  For one draw the keep indicators have variance p(1-p), p=k/n, and covariance -p(1-p)/(n-1),
  so X = Σ(c_i - Mp)^2/(Mp) over M draws is asymptotically c·χ²(n-1) with
  c = (1-p)·n/(n-1) = 6/7. The 0.999 quantile of χ²(7) is 24.32 (standard table), so the test
  rejects X/c > 24.32. The keys are fixed, so the outcome is deterministic.
  """
  m, k, n = 4000, 2, NV
  state, _ = batch([Example(0, 3, n, 2)])
  s1 = one(state)
  keys = jax.random.split(jax.random.key(123), m)
  scores = jax.jit(jax.vmap(lambda key: random_method.score(s1, {}, key, k)))(keys)
  picks = np.asarray(jax.lax.top_k(scores, k)[1])
  counts = np.bincount(picks.ravel(), minlength=s1.valid.shape[0])
  vis = np.asarray(s1.visual)
  assert counts[~vis].sum() == 0
  p = k / n
  stat = ((counts[vis] - m * p) ** 2 / (m * p)).sum() / ((1 - p) * n / (n - 1))
  assert stat < 24.32, (stat, counts[vis])
  # The same statistic detects a mild bias: drop a quarter of one token's picks.
  biased = counts[vis].astype(float)
  biased[0] *= 0.75
  biased[1:] += counts[vis][0] * 0.25 / (n - 1)
  assert ((biased - m * p) ** 2 / (m * p)).sum() / ((1 - p) * n / (n - 1)) > 24.32


def test_visual_rank_survives_padding_and_earlier_stages():
  state, _ = batch([Example(0, 3, NV, 2), Example(1, 0, NV, 5)], length=18)
  start = np.array([18 - 13 + 3, 18 - 13 + 0])   # left padding + prefix
  scores = jnp.asarray(np.random.default_rng(0).random((2, 18)), jnp.float32)
  first = jax.jit(select.prune, static_argnums=(2, 3, 4))(state, scores, 5, "compact", NV)
  for st in (state, first):
    rank = np.asarray(jax.vmap(random_method.visual_rank)(st))
    vis = np.asarray(st.visual)
    for b in range(2):
      np.testing.assert_array_equal(rank[b][vis[b]], np.asarray(st.origin[b])[vis[b]] - start[b])
