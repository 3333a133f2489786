"""CADIT losses (spec §3) as pure functions of logits, labels and masks.

Contracts: logits_BxK are unnormalised class scores, labels_B int class ids, probs_BxK rows that
sum to 1, mask_B in {0, 1}. Every loss returns a scalar mean over the batch. Masked means are
sum(m * l) / max(sum(m), 1) so shapes stay static under jit (an empty mask gives 0).
"""
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxK, labels_B):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B).mean()


def soft_cross_entropy(logits_BxK, probs_BxK):
  return optax.softmax_cross_entropy(logits_BxK, probs_BxK).mean()


def masked_mean(values_B, mask_B):
  mask_B = mask_B.astype(values_B.dtype)
  return (values_B * mask_B).sum() / jnp.maximum(mask_B.sum(), 1.0)


def masked_cross_entropy(logits_BxK, labels_B, mask_B):
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)
  return masked_mean(ce_B, mask_B)


def pseudo_labels(probs_BxK, tau: float):
  """-> (yhat_B argmax, conf_B max prob, mask_B = conf >= tau as float). No gradient."""
  probs_BxK = jax.lax.stop_gradient(probs_BxK)
  conf_B = probs_BxK.max(-1)
  return probs_BxK.argmax(-1), conf_B, (conf_B >= tau).astype(probs_BxK.dtype)


def conditioned_label(probs_BxK, beta):
  """What D sees as the label: beta * probs + (1 - beta) * uniform (§3.3 ramp-in)."""
  k = probs_BxK.shape[-1]
  return beta * probs_BxK + (1.0 - beta) / k


def gan_d_loss(real_logits_B, fake_logits_B, kind: str = "bce"):
  """Discriminator loss: real -> 1, fake -> 0. kind "bce" (sigmoid BCE on logits) or "lsgan"."""
  if kind == "lsgan":
    return 0.5 * (((real_logits_B - 1.0) ** 2).mean() + (fake_logits_B ** 2).mean())
  real = optax.sigmoid_binary_cross_entropy(real_logits_B, jnp.ones_like(real_logits_B))
  fake = optax.sigmoid_binary_cross_entropy(fake_logits_B, jnp.zeros_like(fake_logits_B))
  return real.mean() + fake.mean()


def gan_g_loss(fake_logits_B, kind: str = "bce"):
  """Non-saturating generator loss: fake -> 1."""
  if kind == "lsgan":
    return 0.5 * ((fake_logits_B - 1.0) ** 2).mean()
  return optax.sigmoid_binary_cross_entropy(fake_logits_B, jnp.ones_like(fake_logits_B)).mean()


def joint2k_targets(probs_BxK, domain: int):
  """(domain x class) targets for a 2K-way joint discriminator: class c of domain d -> d*K + c."""
  zeros = jnp.zeros_like(probs_BxK)
  return jnp.concatenate([zeros, probs_BxK] if domain else [probs_BxK, zeros], axis=-1)


def joint2k_d_loss(real_logits_Bx2K, real_probs_BxK, fake_logits_Bx2K, fake_probs_BxK):
  """Real pairs sit in the 'real' half (d=1), fakes in the 'fake' half (d=0), each by class."""
  return (soft_cross_entropy(real_logits_Bx2K, joint2k_targets(real_probs_BxK, 1))
          + soft_cross_entropy(fake_logits_Bx2K, joint2k_targets(fake_probs_BxK, 0)))


def joint2k_g_loss(fake_logits_Bx2K, fake_probs_BxK):
  """The generator wants its output of class y classified as real class y."""
  return soft_cross_entropy(fake_logits_Bx2K, joint2k_targets(fake_probs_BxK, 1))


def kl(p_BxK, logq_BxK):
  """KL(p || q) per example from probabilities p and log-probabilities of q."""
  return (p_BxK * (jnp.log(jnp.clip(p_BxK, 1e-12)) - logq_BxK)).sum(-1)


def symmetric_kl(logits_a_BxK, logits_b_BxK):
  """0.5 KL(sg(pa) || pb) + 0.5 KL(sg(pb) || pa): each side is pulled toward the other (§3.4)."""
  la, lb = jax.nn.log_softmax(logits_a_BxK), jax.nn.log_softmax(logits_b_BxK)
  pa, pb = jax.lax.stop_gradient(jnp.exp(la)), jax.lax.stop_gradient(jnp.exp(lb))
  return 0.5 * (kl(pa, lb).mean() + kl(pb, la).mean())


def hard_consistency(logits_a_BxK, logits_b_BxK, tau: float):
  """Hard-label §3.4 variant: each side's confident argmax is the other side's target."""
  ya, _, ma = pseudo_labels(jax.nn.softmax(logits_a_BxK), tau)
  yb, _, mb = pseudo_labels(jax.nn.softmax(logits_b_BxK), tau)
  return 0.5 * (masked_cross_entropy(logits_b_BxK, ya, ma)
                + masked_cross_entropy(logits_a_BxK, yb, mb))


def l1(a, b):
  return jnp.abs(a - b).mean()


def similarity_structure(feat_a_BxF, feat_b_BxF):
  """sp_mode "feature": MSE between the batch cosine-similarity matrices of two feature sets."""
  def cos(f):
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-8)
    return f @ f.T
  return ((cos(feat_a_BxF) - cos(feat_b_BxF)) ** 2).mean()


def domain_loss(src_logits_B, tgt_logits_B):
  """DANN domain classification: source -> 1, target -> 0 (sigmoid BCE)."""
  return gan_d_loss(src_logits_B, tgt_logits_B, "bce")


def ramp_progress(step, total, frac: float):
  """r = min(step / (frac * total), 1), from the step counter (traced-safe)."""
  return jnp.clip(step / jnp.maximum(frac * total, 1.0), 0.0, 1.0)


def exp_rampup(step, total, frac: float):
  """exp(-5 (1 - r)^2): 0.0067 at step 0, 1 from frac * total on (§3.6)."""
  return jnp.exp(-5.0 * (1.0 - ramp_progress(step, total, frac)) ** 2)


