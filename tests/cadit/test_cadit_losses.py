"""Every CADIT loss on hand-made inputs: perfect / fooled discriminators, constant classifiers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import domain
from jaxmm.cadit import losses

K = 10
BIG = 30.0  # a logit this large is a certain decision: sigmoid/softmax losses ~ exp(-30) ~ 0


def _onehot_logits(labels, k=K):
  return BIG * jax.nn.one_hot(jnp.asarray(labels), k)


def test_cross_entropy_perfect_and_constant_classifier():
  y = jnp.array([0, 3, 9])
  assert losses.cross_entropy(_onehot_logits(y), y) < 1e-6
  # A constant classifier (equal logits) pays log K whatever the label.
  np.testing.assert_allclose(losses.cross_entropy(jnp.zeros((3, K)), y), math.log(K), rtol=1e-6)
  probs = jax.nn.one_hot(y, K)
  np.testing.assert_allclose(losses.soft_cross_entropy(jnp.zeros((3, K)), probs), math.log(K),
                             rtol=1e-6)


def test_masked_cross_entropy_counts_only_masked_rows_and_empty_mask_is_zero():
  y = jnp.array([1, 2])
  logits = jnp.stack([_onehot_logits(1), jnp.zeros(K)])  # row 0 right, row 1 constant
  np.testing.assert_allclose(losses.masked_cross_entropy(logits, y, jnp.array([0.0, 1.0])),
                             math.log(K), rtol=1e-6)
  assert losses.masked_cross_entropy(logits, y, jnp.array([1.0, 0.0])) < 1e-6
  assert losses.masked_cross_entropy(logits, y, jnp.zeros(2)) == 0.0


def test_pseudo_labels_threshold_and_constant_classifier_masks_everything():
  probs = jnp.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]])
  yhat, conf, mask = losses.pseudo_labels(probs, 0.9)
  np.testing.assert_array_equal(yhat, [0, 0, 1])
  np.testing.assert_allclose(conf, [0.95, 0.6, 0.9])
  np.testing.assert_array_equal(mask, [1.0, 0.0, 1.0])
  _, _, mask = losses.pseudo_labels(jnp.full((4, K), 1.0 / K), 0.9)
  assert mask.sum() == 0  # a constant classifier never self-labels


@pytest.mark.parametrize("kind", ["bce", "lsgan"])
def test_gan_losses_perfect_and_fooled_discriminator(kind):
  n = 4
  if kind == "bce":
    real, fake = jnp.full(n, BIG), jnp.full(n, -BIG)
  else:
    real, fake = jnp.ones(n), jnp.zeros(n)
  assert losses.gan_d_loss(real, fake, kind) < 1e-6  # a perfect D
  assert losses.gan_g_loss(real, kind) < 1e-6  # D fully fooled: G is done
  if kind == "bce":  # perfect D: the non-saturating G loss is -log sigmoid(-30) = 30
    np.testing.assert_allclose(losses.gan_g_loss(fake, kind), BIG, rtol=1e-6)
    np.testing.assert_allclose(losses.gan_d_loss(fake, real, kind), 2 * BIG, rtol=1e-6)
    np.testing.assert_allclose(losses.gan_d_loss(jnp.zeros(n), jnp.zeros(n), kind),
                               2 * math.log(2), rtol=1e-6)  # undecided D
  else:
    np.testing.assert_allclose(losses.gan_g_loss(fake, kind), 0.5)


def test_joint2k_losses():
  y_real, y_fake = jnp.array([2, 5]), jnp.array([7, 1])
  p_real, p_fake = jax.nn.one_hot(y_real, K), jax.nn.one_hot(y_fake, K)
  # Perfect joint D: real class c scores K + c, fake class c scores c.
  real_logits = _onehot_logits(y_real + K, 2 * K)
  fake_logits = _onehot_logits(y_fake, 2 * K)
  assert losses.joint2k_d_loss(real_logits, p_real, fake_logits, p_fake) < 1e-6
  np.testing.assert_allclose(losses.joint2k_g_loss(fake_logits, p_fake), BIG, rtol=1e-5)
  # A fake that D calls "real, same class" satisfies G; "real, other class" does not.
  assert losses.joint2k_g_loss(_onehot_logits(y_fake + K, 2 * K), p_fake) < 1e-6
  assert losses.joint2k_g_loss(_onehot_logits(y_real + K, 2 * K), p_fake) > 10


def test_symmetric_kl_values_and_stop_gradients():
  a = jnp.array([[2.0, 0.0, -1.0]])
  assert losses.symmetric_kl(a, a) < 1e-7
  const = jnp.zeros((1, 3))
  pa = jax.nn.softmax(a)
  want = 0.5 * (np.sum(pa * np.log(pa * 3)) + np.sum(np.log((1 / 3) / pa)) / 3)
  np.testing.assert_allclose(losses.symmetric_kl(a, const), want, rtol=1e-5)
  # Each side only receives the gradient of the KL term in which it is the model, not the target.
  ga = jax.grad(lambda x: losses.symmetric_kl(x, const))(a)
  np.testing.assert_allclose(ga, 0.5 * jax.grad(lambda x: losses.kl(jnp.full((1, 3), 1 / 3),
                                                                    jax.nn.log_softmax(x)).mean())(a),
                             rtol=1e-5)


def test_hard_consistency():
  a = _onehot_logits([1, 4])
  assert losses.hard_consistency(a, a, 0.9) < 1e-6
  np.testing.assert_allclose(losses.hard_consistency(a, _onehot_logits([2, 4]), 0.9), 0.5 * BIG * 2 / 2,
                             rtol=1e-5)  # row 0 disagrees both ways (CE 30), row 1 agrees
  assert losses.hard_consistency(jnp.zeros((2, K)), jnp.zeros((2, K)), 0.9) == 0.0


def test_l1_similarity_structure_and_labels():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_allclose(losses.l1(x, x + 0.5), 0.5)
  f = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  assert losses.similarity_structure(f, 3.0 * f) < 1e-10  # cosine structure ignores scale
  assert losses.similarity_structure(f, f[::-1]) > 0.05
  q = jax.nn.one_hot(jnp.array([3]), K)
  np.testing.assert_allclose(losses.conditioned_label(q, 0.0), jnp.full((1, K), 0.1))
  np.testing.assert_allclose(losses.conditioned_label(q, 1.0), q)


def test_ramps():
  np.testing.assert_allclose(losses.exp_rampup(0, 100, 0.2), math.exp(-5), rtol=1e-6)
  assert losses.exp_rampup(20, 100, 0.2) == 1.0 and losses.exp_rampup(90, 100, 0.2) == 1.0
  np.testing.assert_allclose(losses.ramp_progress(10, 100, 0.2), 0.5)
  assert domain.dann_lambda(0, 100, 10.0) == 0.0
  np.testing.assert_allclose(domain.dann_lambda(100, 100, 10.0), 2 / (1 + math.exp(-10)) - 1,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.domain_loss(jnp.full(3, BIG), jnp.full(3, -BIG)), 0.0,
                             atol=1e-6)
