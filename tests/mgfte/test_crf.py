"""CRF forward algorithm and Viterbi against brute-force enumeration of all tag paths."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.mgfte import crf as crf_lib

T = 3


def _problem(seed, b=4, l=5):
  rng = np.random.default_rng(seed)
  crf = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
         for k, s in (("start", (T,)), ("end", (T,)), ("trans", (T, T)))}
  em = jnp.asarray(rng.normal(size=(b, l, T)) * 2, jnp.float32)
  lengths = np.array([l, 1, 3, 4][:b])           # full, only position 0, and padded sequences
  mask = jnp.asarray(np.arange(l)[None] < lengths[:, None])
  return crf, em, mask, lengths


def _brute(crf, em_LxT, n):
  """(log Z, best path, score of every path) by enumerating all T^n paths."""
  c = {k: np.asarray(v, np.float64) for k, v in crf.items()}
  e = np.asarray(em_LxT, np.float64)
  scores = {}
  for path in itertools.product(range(T), repeat=n):
    s = c["start"][path[0]] + e[0, path[0]] + c["end"][path[-1]]
    s += sum(c["trans"][path[i - 1], path[i]] + e[i, path[i]] for i in range(1, n))
    scores[path] = s
  vals = np.array(list(scores.values()))
  log_z = vals.max() + np.log(np.exp(vals - vals.max()).sum())
  return log_z, max(scores, key=scores.get), scores


@pytest.mark.parametrize("seed", [0, 1])
def test_log_partition_and_likelihood_match_enumeration(seed):
  crf, em, mask, lengths = _problem(seed)
  rng = np.random.default_rng(seed + 10)
  tags = rng.integers(0, T, size=mask.shape)
  log_z = np.asarray(jax.jit(crf_lib.log_partition)(crf, em, mask))
  ll = np.asarray(jax.jit(crf_lib.log_likelihood)(crf, em, jnp.asarray(tags), mask))
  for i, n in enumerate(lengths):
    want_z, _, scores = _brute(crf, em[i], n)
    np.testing.assert_allclose(log_z[i], want_z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ll[i], scores[tuple(tags[i, :n])] - want_z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_matches_brute_force_argmax(seed):
  crf, em, mask, lengths = _problem(seed)
  got = np.asarray(jax.jit(crf_lib.viterbi)(crf, em, mask))
  for i, n in enumerate(lengths):
    _, best, _ = _brute(crf, em[i], n)
    assert tuple(got[i, :n]) == best
    assert (got[i, n:] == 0).all()


def test_padding_content_is_ignored():
  crf, em, mask, _ = _problem(3)
  noisy = jnp.where(mask[..., None], em, 1e3)
  tags = jnp.zeros(mask.shape, jnp.int32)
  np.testing.assert_allclose(crf_lib.log_likelihood(crf, em, tags, mask),
                             crf_lib.log_likelihood(crf, noisy, tags, mask), rtol=1e-6)
  np.testing.assert_array_equal(crf_lib.viterbi(crf, em, mask), crf_lib.viterbi(crf, noisy, mask))
