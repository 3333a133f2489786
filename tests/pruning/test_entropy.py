"""EntropyPrune against a float64 NumPy reference of pruning.md §2.1, and its invariances."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings, strategies as st

from prune_layouts import Example, batch
from jaxmm.config import LlamaConfig
from jaxmm.layers import rope
from jaxmm.pruning import entropy, schedule, select

apply_jit = jax.jit(select.apply_stage, static_argnums=0)

N, H, DH, K = 64, 8, 16, 10


def reference_entropy(q_NxHxK):
  """§2.1 in float64, token by token: centre over heads, dual Gram / H, eigvalsh, clamp, -Σλlnλ/lnH."""
  out = []
  for x in np.asarray(q_NxHxK, np.float64):
    r = x - x.mean(axis=0, keepdims=True)
    lam = np.maximum(np.linalg.eigvalsh(r @ r.T / x.shape[0]), 1e-10)
    out.append(-(lam * np.log(lam)).sum() / np.log(x.shape[0]))
  return np.array(out)


def queries(seed, n=N, h=H, dh=DH):
  """Random queries with per-token scales and per-head offsets, like real activations."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((n, h, dh)) * rng.uniform(0.3, 1.5, (n, 1, 1)) + rng.standard_normal((1, 1, dh))
  return q.astype(np.float32)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_scores_match_float64_reference_and_top_k(seed):
  q = queries(seed)
  want = reference_entropy(q)
  got = np.asarray(jax.jit(entropy.token_entropy)(jnp.asarray(q)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  ranked = np.sort(want)[::-1]
  assume(ranked[K - 1] - ranked[K] > 1e-4)   # the top-k set is only defined up to ties
  assert set(np.argsort(-got)[:K]) == set(np.argsort(-want)[:K])


def test_dual_and_primal_spectra_agree_on_the_nonzero_part():
  q = jnp.asarray(queries(1, n=16))
  dual = np.asarray(jax.vmap(lambda x: entropy.spectrum(x, "dual"))(q))       # ascending, [16, H]
  primal = np.asarray(jax.vmap(lambda x: entropy.spectrum(x, "primal"))(q))   # ascending, [16, DH]
  scale = dual.max(axis=1, keepdims=True)
  # Centring over heads makes the rank H-1: one zero in the dual, DH-H+1 zeros in the primal.
  np.testing.assert_allclose(primal[:, -(H - 1):], dual[:, 1:], rtol=0, atol=1e-5 * scale.max())
  assert np.all(np.abs(dual[:, :1]) <= 1e-5 * scale)
  assert np.all(np.abs(primal[:, :DH - H + 1]) <= 1e-5 * scale)
  assert np.all(dual[:, 1:] > 1e-3 * scale)   # the non-zero part is really non-zero
  np.testing.assert_allclose(entropy.token_entropy(q, "primal"), entropy.token_entropy(q, "dual"),
                             rtol=0, atol=1e-4)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_invariant_to_rope_on_the_queries(seed):
  q = jnp.asarray(queries(seed))[None]
  pos = jnp.asarray(np.random.default_rng(seed).integers(0, 4096, (1, N)), jnp.int32)
  sin, cos = rope.sin_cos(pos, rope.inv_frequencies(LlamaConfig(head_dim=DH)))
  rotated = rope.apply_rope(q, sin, cos)
  assert float(jnp.abs(rotated - q).max()) > 0.1     # the rotation really changed the queries
  np.testing.assert_allclose(entropy.token_entropy(rotated[0]), entropy.token_entropy(q[0]),
                             rtol=0, atol=1e-4)


def test_not_trace_normalised():
  """As in the reference code, scaling a token's queries changes its score (§2.1 note)."""
  q = jnp.asarray(queries(2, n=4))
  assert float(jnp.abs(entropy.token_entropy(2 * q) - entropy.token_entropy(q)).min()) > 1e-2


def test_stage_keeps_the_highest_entropy_visual_tokens():
  ex = Example(5, 3, 8, 4)
  state, aux = batch([ex])
  (stage,) = schedule.resolve(schedule.parse("entropy@2:3"), 8, 4)
  s = entropy.score(jax.tree.map(lambda a: a[0], state), {"queries": aux["queries"][0]}, None, 3)
  vis = np.asarray(state.visual[0])
  assert np.all(np.isneginf(np.asarray(s)[~vis]))
  want = reference_entropy(aux["queries"][0])
  picks = np.flatnonzero(vis)[np.argsort(-want[vis])[:3]]
  out = apply_jit(stage, state, aux, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(select.kept_indices(out))[0], np.sort(picks))
