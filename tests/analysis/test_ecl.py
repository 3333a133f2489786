"""ECL curves and rule on a synthetic stack whose visual block collapses to rank 1 at a known layer."""
import numpy as np
import pytest

from jaxmm.analysis import ecl

L, H, DH, D, PRE, NV, SUF = 8, 4, 12, 16, 3, 16, 2


def synthetic(collapse: int, seed=0):
  """hidden f[L, T, D], queries f[L, T, H, dh], visual bool[T]; visual rows rank 1 from `collapse`."""
  rng = np.random.default_rng(seed)
  t = PRE + NV + SUF
  visual = np.zeros(t, bool)
  visual[PRE:PRE + NV] = True
  hidden = rng.standard_normal((L, t, D))
  queries = 0.25 * rng.standard_normal((L, t, H, DH))   # eigenvalues of R R^T / H in (0, 1)
  u, v = rng.standard_normal(D), rng.standard_normal(DH)
  for l in range(collapse, L):
    signs = rng.choice([-1.0, 1.0], NV) * rng.uniform(0.5, 2.0, NV)
    hidden[l, visual] = signs[:, None] * u            # one direction: global entropy 0
    heads = rng.standard_normal((NV, H)) * 1e-3       # each token's head matrix is rank 1 and tiny
    queries[l, visual] = heads[:, :, None] * v
  return hidden.astype(np.float32), queries.astype(np.float32), visual


def token_entropy_ref(x_HxK):
  r = x_HxK.astype(np.float64) - x_HxK.astype(np.float64).mean(0)
  lam = np.maximum(np.linalg.eigvalsh(r @ r.T / H), 1e-10)
  return -(lam * np.log(lam)).sum() / np.log(H)


def global_entropy_ref(z_NxD):
  z = z_NxD.astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  z = z - z.mean(0)
  c = z.T @ z                                         # primal D x D: same non-zero spectrum
  lam = np.linalg.eigvalsh(c / np.trace(c))
  lam = lam[lam > 1e-10]
  return -(lam * np.log(lam)).sum() / np.log(len(z_NxD))


@pytest.mark.parametrize("collapse", [1, 3, 4])
def test_ecl_finds_collapse_layer_and_curves_match_numpy(collapse):
  hidden, queries, visual = synthetic(collapse, seed=collapse)
  s_mean, s_glob = map(np.asarray, ecl.curves(hidden, queries, visual))
  ref_mean = [np.mean([token_entropy_ref(queries[l, i]) for i in np.flatnonzero(visual)])
              for l in range(L)]
  ref_glob = [global_entropy_ref(hidden[l, visual]) for l in range(L)]
  np.testing.assert_allclose(s_mean, ref_mean, atol=1e-4)
  np.testing.assert_allclose(s_glob, ref_glob, atol=1e-4)
  assert s_glob[collapse:].max() < 1e-3 < s_glob[:collapse].min()
  assert ecl.ecl_layer(s_mean) == collapse


def test_ecl_rule_window():
  # the largest drop is at layer 6, beyond L/2 = 4, so the rule picks the largest within 1..4
  s = np.array([1.0, 0.9, 0.6, 0.55, 0.5, 0.45, 0.0, 0.0])
  assert ecl.ecl_layer(s) == 2
