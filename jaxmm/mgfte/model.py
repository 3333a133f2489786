"""MG-FTE (mgfte.md §3) and the prototype baseline, as pure functions over a params pytree.

params = {"encoder": BERT params, "head": {...}}. The MG-FTE head holds `fuse` (Wp, 4D -> D),
`rel_hidden` (W1, 4D -> D), `rel_out` (w2, D -> 1) and `crf`; the baseline head only `crf`.
Shapes: B episodes, N ways, K shots, NQ = N * Q queries, L positions, D width, T = 5 tags.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxmm import config as config_lib
from jaxmm.errors import ConfigError
from jaxmm.mgfte import crf as crf_lib
from jaxmm.models import bert

NEG = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class Config(config_lib.Serializable):
  """variant: "mgfte" | "baseline". pool_mode: "reference" (pool over the batch's longest
  query, padded rows included, §6.2) | "masked" (proper masking)."""
  variant: str = "mgfte"
  pool_mode: str = "reference"
  feature_dropout: float = 0.2
  num_tags: int = 5

  def __post_init__(self):
    if self.variant not in ("mgfte", "baseline"):
      raise ConfigError(f"mgfte variant must be mgfte or baseline, got {self.variant!r}")
    if self.pool_mode not in ("reference", "masked"):
      raise ConfigError(f"pool_mode must be reference or masked, got {self.pool_mode!r}")


def _torch_dense(key, n_in: int, n_out: int) -> dict:
  """PyTorch's default Linear init: weights and biases U(+-1/sqrt(fan_in)) (bp matters, §6.2)."""
  kw, kb = jax.random.split(key)
  bound = n_in ** -0.5
  return {"kernel": jax.random.uniform(kw, (n_in, n_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound)}


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_head(cfg: Config, d: int, key) -> dict:
  k_fuse, k_hid, k_out, k_crf = jax.random.split(key, 4)
  head = {"crf": crf_lib.init(k_crf, cfg.num_tags)}
  if cfg.variant == "mgfte":
    head.update(fuse=_torch_dense(k_fuse, 4 * d, d), rel_hidden=_torch_dense(k_hid, 4 * d, d),
                rel_out=_torch_dense(k_out, d, 1))
  return head


def encode(bcfg, cfg: Config, enc_params, ids_NxL, mask_NxL, rng=None):
  """Encoder features f[n, L, D], exactly 0 on padded rows; dropout only when `rng` is given."""
  k_bert, k_drop = (None, None) if rng is None else jax.random.split(rng)
  h = bert.forward(bcfg, enc_params, input_ids=ids_NxL, attention_mask=mask_NxL,
                   dropout_rng=k_bert).last_hidden_state
  if rng is not None:
    keep = jax.random.bernoulli(k_drop, 1.0 - cfg.feature_dropout, h.shape)
    h = jnp.where(keep, h / (1.0 - cfg.feature_dropout), 0.0)
  return h * mask_NxL[..., None].astype(h.dtype)


def tag_prototypes(hs_BxNxKxLxD, tags_BxNxKxL, mask_BxNxKxL, num_tags: int):
  """P f[B, N, T, D]: per sentence the masked mean of each tag's tokens (0 if the tag is
  absent), then a plain mean over K with those zeros included (§3.2, kept on purpose)."""
  onehot = jax.nn.one_hot(tags_BxNxKxL, num_tags) * mask_BxNxKxL[..., None]
  total_BxNxKxTxD = jnp.einsum("bnklt,bnkld->bnktd", onehot, hs_BxNxKxLxD)
  count_BxNxKxT = onehot.sum(axis=3)
  return (total_BxNxKxTxD / jnp.maximum(count_BxNxKxT, 1.0)[..., None]).mean(axis=2)


def fuse(head, x, y):
  """relu(Wp [x, y, |x - y|, x * y] + bp), one Dense shared by both sides."""
  return jax.nn.relu(_dense(head["fuse"], jnp.concatenate([x, y, jnp.abs(x - y), x * y], -1)))


def co_attention(head, p_BxNxTxD, hq_BxQxLxD, qmask_BxQxL):
  """Proto-level fusion per (query, class): S_hat f[B, NQ, N, T, D], Q_hat f[B, NQ, N, L, D]."""
  a_BxQxNxTxL = jnp.einsum("bntd,bqld->bqntl", p_BxNxTxD, hq_BxQxLxD)
  valid = qmask_BxQxL[:, :, None, None, :].astype(bool)
  tag_to_tok = jax.nn.softmax(jnp.where(valid, a_BxQxNxTxL, NEG), axis=-1)
  ps_BxQxNxTxD = jnp.einsum("bqntl,bqld->bqntd", tag_to_tok, hq_BxQxLxD)
  qs_BxQxNxLxD = jnp.einsum("bqntl,bntd->bqnld", jax.nn.softmax(a_BxQxNxTxL, axis=-2), p_BxNxTxD)
  qs_BxQxNxLxD = qs_BxQxNxLxD * qmask_BxQxL[:, :, None, :, None]
  nq = hq_BxQxLxD.shape[1]
  p_b = jnp.broadcast_to(p_BxNxTxD[:, None], (p_BxNxTxD.shape[0], nq) + p_BxNxTxD.shape[1:])
  s_hat = fuse(head, p_b, ps_BxQxNxTxD)
  q_hat = fuse(head, jnp.broadcast_to(hq_BxQxLxD[:, :, None], qs_BxQxNxLxD.shape), qs_BxQxNxLxD)
  return s_hat, q_hat


def _pool_positions(qmask_BxQxL, pool_mode: str):
  """bool[B, NQ, L]: positions entering the max/sum over L (see Config)."""
  if pool_mode == "masked":
    return qmask_BxQxL.astype(bool)
  longest = qmask_BxQxL.sum(-1).max()
  return jnp.broadcast_to(jnp.arange(qmask_BxQxL.shape[-1]) < longest, qmask_BxQxL.shape)


def relation_logits(head, s_hat, q_hat, qmask_BxQxL, pool_mode: str):
  """Entity-guided relation proto-decoder (§3.4): f[B, NQ, N]."""
  pos = _pool_positions(qmask_BxQxL, pool_mode)[:, :, None, :, None]
  n_valid = qmask_BxQxL.sum(-1)[:, :, None, None].astype(q_hat.dtype)
  u = jnp.concatenate([jnp.where(pos, q_hat, NEG).max(3),
                       jnp.where(pos, q_hat, 0.0).sum(3) / n_valid], -1)
  v = jnp.concatenate([s_hat.max(3), s_hat.mean(3)], -1)
  hidden = jax.nn.relu(_dense(head["rel_hidden"], jnp.concatenate([u, v], -1)))
  return _dense(head["rel_out"], hidden)[..., 0]


def _take_class(x_BxQxNx___, c_BxQ):
  idx = c_BxQ.reshape(c_BxQ.shape + (1,) * (x_BxQxNx___.ndim - 2))
  return jnp.take_along_axis(x_BxQxNx___, idx, axis=2)[:, :, 0]


def distance_emissions(tok_BxQxLxE, proto_BxQxTxE):
  """e(l, t) = -||tok_l - proto_t||: f[B, NQ, L, T]; sqrt clamped so the gradient is finite."""
  d2 = jnp.square(tok_BxQxLxE[:, :, :, None] - proto_BxQxTxE[:, :, None]).sum(-1)
  return -jnp.sqrt(jnp.maximum(d2, 1e-12))


def entity_emissions(s_hat, q_hat, p_BxNxTxD, hq_BxQxLxD, c_BxQ):
  """Relation-guided entity proto-decoder (§3.5) for the chosen class c: f[B, NQ, L, T]."""
  nq = hq_BxQxLxD.shape[1]
  p_b = jnp.broadcast_to(p_BxNxTxD[:, None], (p_BxNxTxD.shape[0], nq) + p_BxNxTxD.shape[1:])
  proto = jnp.concatenate([_take_class(s_hat, c_BxQ), _take_class(p_b, c_BxQ)], -1)
  tok = jnp.concatenate([_take_class(q_hat, c_BxQ), hq_BxQxLxD], -1)
  return distance_emissions(tok, proto)


def baseline_scores(hs, hp_BxNxTxD, hq_BxQxLxD, smask, qmask):
  """Nearest prototypes, no fusion or guidance: (relation logits, emissions)."""
  sent = lambda h, m: h.sum(-2) / m.sum(-1, keepdims=True).astype(h.dtype)
  class_BxNxD = sent(hs, smask).mean(2)
  q_BxQxD = sent(hq_BxQxLxD, qmask)
  logits = -jnp.square(q_BxQxD[:, :, None] - class_BxNxD[:, None]).sum(-1)
  tags_BxQxTxD = jnp.broadcast_to(hp_BxNxTxD.mean(1)[:, None],
                                  q_BxQxD.shape[:2] + hp_BxNxTxD.shape[2:])
  return logits, distance_emissions(hq_BxQxLxD, tags_BxQxTxD)


def encode_episodes(bcfg, cfg: Config, enc_params, batch, rng=None):
  """(hs f[B, N, K, L, D], hq f[B, NQ, L, D]): one encoder call over [support; queries]."""
  b, n, k, l = batch["s_ids"].shape
  nq = batch["q_ids"].shape[1]
  ids = jnp.concatenate([batch["s_ids"].reshape(-1, l), batch["q_ids"].reshape(-1, l)])
  mask = jnp.concatenate([batch["s_mask"].reshape(-1, l), batch["q_mask"].reshape(-1, l)])
  h = encode(bcfg, cfg, enc_params, ids, mask, rng)
  return h[:b * n * k].reshape(b, n, k, l, -1), h[b * n * k:].reshape(b, nq, l, -1)


def scores(bcfg, cfg: Config, params, batch, *, rng=None, gold_relation: bool):
  """(relation logits f[B, NQ, N], emissions f[B, NQ, L, T]) for a batch of episodes.

  `gold_relation`: the entity decoder uses the gold class (training) or the predicted one.
  """
  hs, hq = encode_episodes(bcfg, cfg, params["encoder"], batch, rng)
  return head_scores(cfg, params["head"], hs, hq, batch, gold_relation=gold_relation)


def head_scores(cfg: Config, head, hs, hq, batch, *, gold_relation: bool):
  """`scores` from the encoder features hs f[B, N, K, L, D] and hq f[B, NQ, L, D]. Each
  sentence is encoded on its own, so features computed once per sentence and gathered per
  episode give the same scores (`training.evaluate` relies on it)."""
  p = tag_prototypes(hs, batch["s_tags"], batch["s_mask"], cfg.num_tags)
  if cfg.variant == "baseline":
    return baseline_scores(hs, p, hq, batch["s_mask"], batch["q_mask"])
  s_hat, q_hat = co_attention(head, p, hq, batch["q_mask"])
  logits = relation_logits(head, s_hat, q_hat, batch["q_mask"], cfg.pool_mode)
  c = batch["q_rel"] if gold_relation else jnp.argmax(logits, -1)
  return logits, entity_emissions(s_hat, q_hat, p, hq, c)


def loss_fn(params, bcfg, cfg: Config, batch, rng):
  """Relation cross-entropy + CRF NLL, both means over the B * NQ queries (weights 1:1)."""
  hs, hq = encode_episodes(bcfg, cfg, params["encoder"], batch, rng)
  return task_loss(cfg, params["head"], hs, hq, batch)


def task_loss(cfg: Config, head, hs, hq, batch):
  """`loss_fn` from the encoder features (shaped as in `head_scores`)."""
  logits, em = head_scores(cfg, head, hs, hq, batch, gold_relation=True)
  logp = jax.nn.log_softmax(logits, -1)
  rel_loss = -jnp.take_along_axis(logp, batch["q_rel"][..., None], -1).mean()
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  ent_loss = -crf_lib.log_likelihood(head["crf"], flat(em), flat(batch["q_tags"]),
                                     flat(batch["q_mask"])).mean()
  return rel_loss + ent_loss, {"relation_loss": rel_loss, "entity_loss": ent_loss}


def mean_pooled(h_NxLxD, mask_NxL):
  """f[N, D]: each sentence's mean feature over its valid tokens (MiniLM's own pooling)."""
  m = mask_NxL.astype(h_NxLxD.dtype)
  return (h_NxLxD * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1.0)


def _decode(head, logits, em, q_mask):
  b, nq, l, t = em.shape
  tags = crf_lib.viterbi(head["crf"], em.reshape(b * nq, l, t), q_mask.reshape(b * nq, l))
  return jnp.argmax(logits, -1).astype(jnp.int32), tags.reshape(b, nq, l)


def predict(params, bcfg, cfg: Config, batch):
  """Deterministic decode: (relation i32[B, NQ], tags i32[B, NQ, L])."""
  logits, em = scores(bcfg, cfg, params, batch, gold_relation=False)
  return _decode(params["head"], logits, em, batch["q_mask"])


def predict_features(head, cfg: Config, hs, hq, batch):
  """`predict` from encoder features (`encode` without dropout), shaped as in `head_scores`."""
  logits, em = head_scores(cfg, head, hs, hq, batch, gold_relation=False)
  return _decode(head, logits, em, batch["q_mask"])
