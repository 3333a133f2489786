"""Domain-adversarial step for the cross-domain task (mgfte.md §4.3).

A discriminator Dense(D -> 100) - ReLU - Dropout(0.2) - Dense(100 -> 2) reads pooled encoder
outputs of source (FewRel, label 0) and target (unlabelled PubMed, label 1) sentences.
Modes:
  "inverted"  (default, the FewRel toolkit's intended behaviour) discriminator: SGD on L_D;
              encoder: its own Adam on L_enc = CE(d, 1 - domain) (inverted-label GAN loss).
  "grl"       as "inverted", but the encoder follows -grad L_D (a gradient reversal layer).
  "reference" the shipped code: the discriminator steps on L_D + L_enc and the encoder is never
              updated by this step (its optimiser held no parameters).
These three run as a second step after the task update, on the BERT pooler output.

"dann" (jaxmm's own objective, `joint_loss`) is instead part of the task step: one loss, one
optimiser, L = L_task + L_D(GRL_lam(f)) + mu * L_var, on mean-pooled features f (the pooling
MiniLM was trained with), lam ramped by DANN's schedule, and a variance floor L_var on the
target features (VICReg-style hinge) against the collapse the separate modes produce.
"""
import jax
import jax.numpy as jnp
import optax

from jaxmm import domain
from jaxmm.errors import ConfigError
from jaxmm.mgfte import model as model_lib
from jaxmm.models import bert

MODES = ("inverted", "grl", "reference")


def init_discriminator(key, d: int, hidden: int = 100) -> dict:
  k1, k2 = jax.random.split(key)
  return {"hidden": model_lib._torch_dense(k1, d, hidden), "out": model_lib._torch_dense(k2, hidden, 2)}


def discriminate(disc, feats_NxD, rng, dropout: float = 0.2):
  """Domain logits f[n, 2]; dropout on the hidden layer (training only, so always on here)."""
  h = jax.nn.relu(feats_NxD @ disc["hidden"]["kernel"] + disc["hidden"]["bias"])
  keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
  h = jnp.where(keep, h / (1.0 - dropout), 0.0)
  return h @ disc["out"]["kernel"] + disc["out"]["bias"]


def _ce(logits_Nx2, labels_N):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits_Nx2), labels_N[:, None], -1).mean()


def encoder_optimizer(lr: float = 1e-5, weight_decay: float = 1e-5):
  """The encoder's second, separate Adam (coupled L2, as PyTorch's Adam weight_decay)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(0.9, 0.999, 1e-8),
                     optax.scale(-lr))


def discriminator_optimizer(lr: float = 1e-2):
  return optax.sgd(lr)


def _objective(enc, disc, bcfg, ids, mask, domain, rng, mode):
  """Sum of the discriminator's and the encoder's objectives, each blind to the other's params.

  stop_gradient splits one backward pass: d/d(disc) sees only the discriminator loss and
  d/d(enc) only the encoder loss. Both discriminator passes share the dropout key.
  """
  k_bert, k_disc = jax.random.split(rng)
  feats = bert.forward(bcfg, enc, input_ids=ids, attention_mask=mask,
                       dropout_rng=k_bert).pooler_output
  d_for_disc = discriminate(disc, jax.lax.stop_gradient(feats), k_disc)
  d_for_enc = discriminate(jax.lax.stop_gradient(disc), feats, k_disc)
  loss_d = _ce(d_for_disc, domain)
  disc_obj = loss_d + (_ce(d_for_disc, 1 - domain) if mode == "reference" else 0.0)
  enc_obj = {"inverted": _ce(d_for_enc, 1 - domain), "grl": -_ce(d_for_enc, domain),
             "reference": 0.0}[mode]
  acc = jnp.mean(jnp.argmax(d_for_disc, -1) == domain)
  return disc_obj + enc_obj, {"disc_loss": loss_d, "disc_acc": acc}


def make_step(bcfg, mode: str, enc_tx, disc_tx):
  """A jitted step(params, adv_state, src_ids, src_mask, tgt_ids, tgt_mask, rng).

  adv_state = {"disc", "disc_opt", "enc_opt"}; returns (params, adv_state, metrics). Only
  params["encoder"] can change, and only outside "reference" mode.
  """
  if mode not in MODES:
    raise ConfigError(f"adversarial mode must be one of {MODES}, got {mode!r}")

  @jax.jit
  def step(params, adv, src_ids, src_mask, tgt_ids, tgt_mask, rng):
    ids = jnp.concatenate([src_ids, tgt_ids])
    mask = jnp.concatenate([src_mask, tgt_mask])
    domain = jnp.concatenate([jnp.zeros(len(src_ids), jnp.int32), jnp.ones(len(tgt_ids), jnp.int32)])
    grad_fn = jax.grad(_objective, argnums=(0, 1), has_aux=True)
    (g_enc, g_disc), metrics = grad_fn(params["encoder"], adv["disc"], bcfg, ids, mask, domain,
                                       rng, mode)
    upd, disc_opt = disc_tx.update(g_disc, adv["disc_opt"], adv["disc"])
    adv = {**adv, "disc": optax.apply_updates(adv["disc"], upd), "disc_opt": disc_opt}
    if mode != "reference":
      upd, enc_opt = enc_tx.update(g_enc, adv["enc_opt"], params["encoder"])
      params = {**params, "encoder": optax.apply_updates(params["encoder"], upd)}
      adv = {**adv, "enc_opt": enc_opt}
    return params, adv, metrics

  return step


def init_state(key, params, d: int, enc_tx, disc_tx) -> dict:
  disc = init_discriminator(key, d)
  return {"disc": disc, "disc_opt": disc_tx.init(disc), "enc_opt": enc_tx.init(params["encoder"])}


# ---- "dann": the joint objective -------------------------------------------------------------

def variance_floor(f_NxD, floor_D):
  """mean_d relu(floor_d - std_n f[n, d]): 0 while every feature dimension keeps its spread."""
  return jax.nn.relu(floor_D - jnp.sqrt(f_NxD.var(0) + 1e-6)).mean()


def joint_loss(params, bcfg, mcfg, batch, tgt, lam, floor_D, floor_weight: float, rng):
  """Task loss + domain loss through a gradient reversal + weighted variance floor.

  params = {"encoder", "head", "disc"}; tgt = {"ids", "mask"} i32[M, Lt] target sentences at
  their own length; the source side is the batch's support sentences (as the reference's
  adversarial step takes them). The discriminator descends L_D; through `grad_reverse` the
  encoder ascends lam * L_D. floor_D f[D]: the variance floor of the target features.
  """
  k_src, k_tgt, k_disc = jax.random.split(rng, 3)
  hs, hq = model_lib.encode_episodes(bcfg, mcfg, params["encoder"], batch, k_src)
  loss, aux = model_lib.task_loss(mcfg, params["head"], hs, hq, batch)
  l = hs.shape[-2]
  f_src = model_lib.mean_pooled(hs.reshape(-1, l, hs.shape[-1]), batch["s_mask"].reshape(-1, l))
  ht = model_lib.encode(bcfg, mcfg, params["encoder"], tgt["ids"], tgt["mask"], k_tgt)
  f_tgt = model_lib.mean_pooled(ht, tgt["mask"])
  feats = domain.grad_reverse(jnp.concatenate([f_src, f_tgt]), lam)
  dom = jnp.concatenate([jnp.zeros(len(f_src), jnp.int32), jnp.ones(len(f_tgt), jnp.int32)])
  logits = discriminate(params["disc"], feats, k_disc)
  l_dom, l_var = _ce(logits, dom), variance_floor(f_tgt, floor_D)
  acc = jnp.mean(jnp.argmax(logits, -1) == dom)
  return loss + l_dom + floor_weight * l_var, {**aux, "disc_loss": l_dom, "disc_acc": acc,
                                               "var_loss": l_var, "lam": lam}


def make_joint_step(bcfg, mcfg, tx, floor_weight: float):
  """A jitted step(params, opt_state, batch, tgt, lam f32[], floor f[D], rng) of `joint_loss`
  under one optimiser (the discriminator in the head's group); -> (params, opt_state, metrics)."""

  @jax.jit
  def step(params, opt_state, batch, tgt, lam, floor_D, rng):
    (loss, aux), grads = jax.value_and_grad(joint_loss, has_aux=True)(
        params, bcfg, mcfg, batch, tgt, lam, floor_D, floor_weight, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

  return step


def feature_floor(bcfg, mcfg, enc_params, ids_NxL, mask_NxL, scale: float = 0.5, chunk: int = 64):
  """f32[D]: `scale` x the per-dimension std of the mean-pooled features of these sentences
  under `enc_params` (the initial encoder), encoded without dropout in chunks."""
  # params are an argument, not closed over: a closure would bake them into the program
  enc = jax.jit(lambda p, ids, mask: model_lib.mean_pooled(
      model_lib.encode(bcfg, mcfg, p, ids, mask), mask))
  f = jnp.concatenate([enc(enc_params, ids_NxL[i:i + chunk], mask_NxL[i:i + chunk])
                       for i in range(0, len(ids_NxL), chunk)])
  return scale * f.std(0)
