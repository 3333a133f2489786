"""Linear-chain CRF (pytorch-crf 0.7.2 semantics): forward algorithm and Viterbi under lax.scan.

Params: start f[T], end f[T], trans f[T, T] with trans[i, j] the score of tag i -> tag j.
Masks are prefixes (1 on the first n positions, n >= 1); position 0 must be valid.
"""
import jax
import jax.numpy as jnp


def init(key, num_tags: int) -> dict:
  """All scores U(-0.1, 0.1), as pytorch-crf initialises them."""
  ks, ke, kt = jax.random.split(key, 3)
  u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -0.1, 0.1)
  return {"start": u(ks, (num_tags,)), "end": u(ke, (num_tags,)),
          "trans": u(kt, (num_tags, num_tags))}


def _time_major(em_BxLxT, mask_BxL):
  return jnp.swapaxes(em_BxLxT, 0, 1), jnp.swapaxes(mask_BxL.astype(bool), 0, 1)


def path_score(crf, em_BxLxT, tags_BxL, mask_BxL):
  """Score of the given tag paths: f[B]."""
  em_LxBxT, mask_LxB = _time_major(em_BxLxT, mask_BxL)
  tags_LxB = jnp.swapaxes(tags_BxL, 0, 1)
  emit_LxB = jnp.take_along_axis(em_LxBxT, tags_LxB[..., None], axis=-1)[..., 0]
  trans_LxB = crf["trans"][tags_LxB[:-1], tags_LxB[1:]]           # transitions into l >= 1
  steps = jnp.where(mask_LxB[1:], trans_LxB + emit_LxB[1:], 0.0).sum(0)
  last = mask_BxL.astype(jnp.int32).sum(1) - 1
  last_tag_B = jnp.take_along_axis(tags_BxL, last[:, None], axis=1)[:, 0]
  return crf["start"][tags_LxB[0]] + emit_LxB[0] + steps + crf["end"][last_tag_B]


def log_partition(crf, em_BxLxT, mask_BxL):
  """log Z over all tag paths: f[B] (forward algorithm; padded steps carry alpha over)."""
  em_LxBxT, mask_LxB = _time_major(em_BxLxT, mask_BxL)

  def step(alpha_BxT, xs):
    e_BxT, m_B = xs
    nxt = jax.nn.logsumexp(alpha_BxT[:, :, None] + crf["trans"][None], axis=1) + e_BxT
    return jnp.where(m_B[:, None], nxt, alpha_BxT), None

  alpha, _ = jax.lax.scan(step, crf["start"][None] + em_LxBxT[0], (em_LxBxT[1:], mask_LxB[1:]))
  return jax.nn.logsumexp(alpha + crf["end"][None], axis=1)


def log_likelihood(crf, em_BxLxT, tags_BxL, mask_BxL):
  """log p(tags | emissions): f[B]. The training loss is the mean of its negation."""
  return path_score(crf, em_BxLxT, tags_BxL, mask_BxL) - log_partition(crf, em_BxLxT, mask_BxL)


def viterbi(crf, em_BxLxT, mask_BxL):
  """Best tag path per sequence: i32[B, L], 0 on padded positions.

  Padded steps store identity back-pointers, so backtracking from the last position walks
  unchanged through the padding to the true last tag.
  """
  em_LxBxT, mask_LxB = _time_major(em_BxLxT, mask_BxL)
  t = em_BxLxT.shape[-1]

  def forward_step(score_BxT, xs):
    e_BxT, m_B = xs
    cand_BxTxT = score_BxT[:, :, None] + crf["trans"][None]
    best_BxT = cand_BxTxT.max(axis=1) + e_BxT
    bp_BxT = jnp.where(m_B[:, None], cand_BxTxT.argmax(axis=1), jnp.arange(t)[None])
    return jnp.where(m_B[:, None], best_BxT, score_BxT), bp_BxT

  score, bp_LxBxT = jax.lax.scan(forward_step, crf["start"][None] + em_LxBxT[0],
                                 (em_LxBxT[1:], mask_LxB[1:]))
  last_B = jnp.argmax(score + crf["end"][None], axis=1)

  def back_step(tag_B, bp_BxT):
    prev_B = jnp.take_along_axis(bp_BxT, tag_B[:, None], axis=1)[:, 0]
    return prev_B, prev_B

  _, prev_LxB = jax.lax.scan(back_step, last_B, bp_LxBxT, reverse=True)
  tags_BxL = jnp.concatenate([jnp.swapaxes(prev_LxB, 0, 1), last_B[:, None]], axis=1)
  return jnp.where(mask_BxL.astype(bool), tags_BxL, 0).astype(jnp.int32)
