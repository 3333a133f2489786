"""CADIT objectives (spec §3.1-3.6) over the params dict {role: params}.

Batches: xs_BxHxWxC, ys_B (source, labelled), xt_BxHxWxC (target). The alternating steps each
differentiate one parameter group; the others enter these functions as constants:
  translations  (no gradient): G_st(xs), G_ts(xt) and the pseudo-label probabilities q_t
  d_loss        -> discriminators (L_D)
  g_loss        -> generators (L_sp, L_cyc, L_jadv, L_cc through the translators)
  c_loss        -> classifiers (L_cls, L_cc, L_pl), translations taken from `translations`
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.cadit import losses
from jaxmm.cadit.config import Config
from jaxmm.cadit.networks import Nets
from jaxmm.domain import dann_lambda, grad_reverse


def classify(nets: Nets, params, role: str, x, rng=None):
  """-> (logits_BxK, features_BxF); dropout on when an rng is given (training)."""
  if rng is None:
    return nets.c_t.apply({"params": params[role]}, x)
  return nets.c_t.apply({"params": params[role]}, x, train=True, rngs={"dropout": rng})


def gen(nets: Nets, params, role: str, x):
  return nets.g_st.apply({"params": params[role]}, x)


def disc(nets: Nets, params, role: str, x, y):
  return nets.d_t.apply({"params": params[role]}, x, y)


def batched(fn, *xs):
  """fn on the batch-concatenation of xs, split back into one output per input. Exact here:
  every network normalises per example (instance norm, no batch norm), and one call instead of
  several cuts both compile and run time."""
  out = fn(jnp.concatenate(xs))
  return jnp.split(out, np.cumsum([len(x) for x in xs[:-1]]))


def logits_of(nets: Nets, params, role: str, *xs, rng=None):
  """Classifier `role` logits for several batches in one call -> list of BxK."""
  return batched(lambda x: classify(nets, params, role, x, rng)[0], *xs)


def disc_pairs(nets: Nets, params, role: str, *pairs):
  """D `role` on several (x, y) pairs in one call -> list of logits."""
  ys = jnp.concatenate([y for _, y in pairs])
  return batched(lambda x: disc(nets, params, role, x, ys), *[x for x, _ in pairs])


def schedules(cfg: Config, t):
  """Adaptation-step ramps: D label weight beta, lam_cc(t), lam_pl(t) (§3.3, §3.6)."""
  beta = losses.ramp_progress(t, cfg.steps, cfg.ramp_frac) if cfg.joint_adv else 0.0
  ramp = losses.exp_rampup(t, cfg.steps, cfg.ramp_frac)
  return beta, cfg.lam_cc * ramp * cfg.use_cc, cfg.lam_pl * ramp * cfg.use_pl


def translations(cfg: Config, nets: Nets, params, xs, xt):
  """Translated batches and target pseudo-label probabilities q_t, all without gradient."""
  out = {"fake_t": gen(nets, params, "g_st", xs)}
  pt = jax.nn.softmax(classify(nets, params, "c_t", xt)[0])
  if cfg.bidirectional:
    out["fake_s"] = gen(nets, params, "g_ts", xt)
    ps = jax.nn.softmax(classify(nets, params, "c_s", out["fake_s"])[0])
    out["q_t"] = 0.5 * (pt + ps)
  else:
    out["idt_t"] = gen(nets, params, "g_st", xt)  # G_st on a target image should be identity
    out["q_t"] = pt
  return jax.lax.stop_gradient(out)


def _adv_d(cfg, real_logits, real_lab, fake_logits, fake_lab):
  if cfg.d_mode == "joint2k":
    return losses.joint2k_d_loss(real_logits, real_lab, fake_logits, fake_lab)
  return losses.gan_d_loss(real_logits, fake_logits, cfg.gan_loss)


def _adv_g(cfg, fake_logits, fake_lab):
  if cfg.d_mode == "joint2k":
    return losses.joint2k_g_loss(fake_logits, fake_lab)
  return losses.gan_g_loss(fake_logits, cfg.gan_loss)


def _labels(cfg, ys, q_t, beta):
  """D label inputs: one-hot source labels and soft target labels, both ramped from uniform
  (mixing only q_t would let D tell real from fake by the label's sharpness)."""
  ys_1h = jax.nn.one_hot(ys, cfg.num_classes)
  return losses.conditioned_label(ys_1h, beta), losses.conditioned_label(q_t, beta)


def d_loss(cfg: Config, nets: Nets, params, batch, tr, t):
  """L_D: real (xt, q_t) vs fake (G_st(xs), ys) in D_t; real (xs, ys) vs fake (G_ts(xt), q_t)."""
  lab_s, lab_t = _labels(cfg, batch["ys"], tr["q_t"], schedules(cfg, t)[0])
  real, fake = disc_pairs(nets, params, "d_t", (batch["xt"], lab_t), (tr["fake_t"], lab_s))
  total = _adv_d(cfg, real, lab_t, fake, lab_s)
  if cfg.bidirectional:
    real, fake = disc_pairs(nets, params, "d_s", (batch["xs"], lab_s), (tr["fake_s"], lab_t))
    total += _adv_d(cfg, real, lab_s, fake, lab_t)
  return total, {"loss_d": total}


def _consistency(cfg, logits_a, logits_b):
  if cfg.cc_mode == "hard":
    return losses.hard_consistency(logits_a, logits_b, cfg.tau)
  return losses.symmetric_kl(logits_a, logits_b)


def _g_terms_bidirectional(cfg, nets, params, batch, tr):
  """(sp, cyc, cc) through both translators and the round trips; classifiers in eval mode."""
  xs, ys, xt = batch["xs"], batch["ys"], batch["xt"]
  fake_t = gen(nets, params, "g_st", xs)
  back_s, fake_s = batched(lambda x: gen(nets, params, "g_ts", x), fake_t, xt)
  round_t = gen(nets, params, "g_st", fake_s)
  cyc = losses.l1(back_s, xs) + losses.l1(round_t, xt)
  l_fake_t, l_round_t, l_xt = logits_of(nets, params, "c_t", fake_t, round_t, xt)
  l_back_s, l_fake_s = logits_of(nets, params, "c_s", back_s, fake_s)
  cc = _consistency(cfg, l_xt, l_fake_s)
  if cfg.sp_mode == "feature":
    sp = _sp_feature(cfg, nets, params, batch, fake_t, fake_s)
  else:
    yhat, _, mask = losses.pseudo_labels(tr["q_t"], cfg.tau)
    sp = (losses.cross_entropy(l_fake_t, ys) + losses.cross_entropy(l_back_s, ys)
          + losses.masked_cross_entropy(l_fake_s, yhat, mask)
          + losses.masked_cross_entropy(l_round_t, yhat, mask))
  return (fake_t, fake_s), sp, cyc, cc, l_fake_t


def _g_terms_unidirectional(cfg, nets, params, batch, tr):
  """(sp, cyc=0, cc): L_sp through the frozen source classifier C_s, identity on targets."""
  del tr
  xs, ys, xt = batch["xs"], batch["ys"], batch["xt"]
  fake_t, idt = batched(lambda x: gen(nets, params, "g_st", x), xs, xt)
  l_fake_t, l_xt, l_idt = logits_of(nets, params, "c_t", fake_t, xt, idt)
  cc = _consistency(cfg, l_xt, l_idt) + cfg.lam_idt * losses.l1(idt, xt)
  if cfg.sp_mode == "feature":
    sp = _sp_feature(cfg, nets, params, batch, fake_t, None)
  else:
    sp = losses.cross_entropy(classify(nets, params, "c_s", fake_t)[0], ys)
  return (fake_t, None), sp, 0.0, cc, l_fake_t


def _sp_feature(cfg, nets, params, batch, fake_t, fake_s):
  """L_sp, feature form: translation keeps the batch's class-similarity structure."""
  feat = lambda role, x: classify(nets, params, role, x)[1]
  total = losses.similarity_structure(feat("c_s", batch["xs"]), feat("c_t", fake_t))
  if cfg.bidirectional:
    total += losses.similarity_structure(feat("c_t", batch["xt"]), feat("c_s", fake_s))
  return total


def g_loss(cfg: Config, nets: Nets, params, batch, tr, t):
  """Generator side of L_G; classifier and discriminator params are constants here."""
  beta, lam_cc, _ = schedules(cfg, t)
  lab_s, lab_t = _labels(cfg, batch["ys"], tr["q_t"], beta)
  terms = _g_terms_bidirectional if cfg.bidirectional else _g_terms_unidirectional
  (fake_t, fake_s), sp, cyc, cc, l_fake_t = terms(cfg, nets, params, batch, tr)
  adv = _adv_g(cfg, disc(nets, params, "d_t", fake_t, lab_s), lab_s)
  if cfg.bidirectional:
    adv += _adv_g(cfg, disc(nets, params, "d_s", fake_s, lab_t), lab_t)
  total = cfg.use_sp * cfg.lam_sp * sp + cfg.lam_cyc * cyc + cfg.lam_adv * adv + lam_cc * cc
  if cfg.sp_to_cls:  # §3.1 flag: the translated-source classification term also trains G_st
    total += losses.cross_entropy(l_fake_t, batch["ys"])
  return total, {"loss_g": total, "sp": sp, "cyc": cyc, "adv_g": adv, "cc": cc}


def c_loss(cfg: Config, nets: Nets, params, batch, tr, t, rng):
  """Classifier side of L_G on fixed translations: L_cls + lam_cc L_cc + lam_pl L_pl."""
  _, lam_cc, lam_pl = schedules(cfg, t)
  k_t, k_s = jax.random.split(rng)
  yhat, _, mask = losses.pseudo_labels(tr["q_t"], cfg.tau)
  feat_terms = {}
  if cfg.bidirectional:
    (l_xt, l_fake_t), feat_terms = _c_t_on_target_and_translations(cfg, nets, params, batch, tr,
                                                                   t, k_t)
    l_xs, l_fake_s = logits_of(nets, params, "c_s", batch["xs"], tr["fake_s"], rng=k_s)
    cls = losses.cross_entropy(l_fake_t, batch["ys"]) + losses.cross_entropy(l_xs, batch["ys"])
    cc = _consistency(cfg, l_xt, l_fake_s)
    pl = (losses.masked_cross_entropy(l_xt, yhat, mask)
          + losses.masked_cross_entropy(l_fake_s, yhat, mask))
  else:
    l_xt, l_fake_t, l_idt = logits_of(nets, params, "c_t", batch["xt"], tr["fake_t"],
                                      tr["idt_t"], rng=k_t)
    cls = losses.cross_entropy(l_fake_t, batch["ys"])
    cc = _consistency(cfg, l_xt, l_idt)
    pl = losses.masked_cross_entropy(l_xt, yhat, mask)
  total = cls + lam_cc * cc + lam_pl * pl + feat_terms.get("feat", 0.0)
  return total, {"loss_c": total, "cls": cls, "pl": pl, "mask_rate": mask.mean(), **feat_terms}


def _c_t_on_target_and_translations(cfg, nets, params, batch, tr, t, rng):
  """C_t logits on xt and G_st(xs), plus (lam_feat > 0) the feature-level domain term: the DANN
  head tells C_t's features of translated source (1) from real target (0) through gradient
  reversal, as CyCADA adds feature-level to pixel-level alignment (spec §8 open question)."""
  b = len(batch["xt"])
  logits, feat = classify(nets, params, "c_t", jnp.concatenate([batch["xt"], tr["fake_t"]]), rng)
  if not cfg.lam_feat:
    return (logits[:b], logits[b:]), {}
  lam = cfg.lam_feat * dann_lambda(t, cfg.steps, cfg.dann_gamma)
  dom = nets.dom.apply({"params": params["dom"]}, grad_reverse(feat, jnp.asarray(lam)))
  return (logits[:b], logits[b:]), {"feat": losses.domain_loss(dom[b:], dom[:b])}


def dann_loss(cfg: Config, nets: Nets, params, batch, t, rng):
  """DANN on C_t: source CE + domain BCE through gradient reversal of the FC-500 features."""
  logits, feat = classify(nets, params, "c_t", jnp.concatenate([batch["xs"], batch["xt"]]), rng)
  b = len(batch["xs"])
  lam = cfg.dann_lam * dann_lambda(t, cfg.steps, cfg.dann_gamma)
  dom = nets.dom.apply({"params": params["dom"]}, grad_reverse(feat, jnp.asarray(lam)))
  cls = losses.cross_entropy(logits[:b], batch["ys"])
  dl = losses.domain_loss(dom[:b], dom[b:])
  return cls + dl, {"loss_c": cls + dl, "cls": cls, "dom": dl}


def source_loss(nets: Nets, params, role: str, batch, rng):
  """Source-only cross-entropy of classifier `role` (pre-training and the source-only method)."""
  loss = losses.cross_entropy(classify(nets, params, role, batch["xs"], rng)[0], batch["ys"])
  return loss, {"loss_c": loss}
