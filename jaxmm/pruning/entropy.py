"""EntropyPrune (pruning.md §2.1, §3): keep the visual tokens with the largest matrix entropy.

Each token's layer-(K-1) query q f[H, d_h] is read as a matrix with one row per head, centred
across heads, and scored by the entropy of the eigenvalues of its dual Gram R R^T / H (H x H),
normalised by ln H. As in the reference code there is no trace normalisation. The primal Gram
R^T R / H (d_h x d_h) has the same non-zero spectrum and is kept for tests and benchmarks.

Pre-RoPE queries are fine: RoPE rotates all heads of a token by the same orthogonal matrix,
which commutes with the centring and cancels in R R^T.
"""
import jax
import jax.numpy as jnp

from jaxmm.pruning.state import TokenState

NEEDS = frozenset({"queries"})
EPS = 1e-10   # eigenvalues are clamped here before λ ln λ (the rank is at most H-1)


def centred(q_HxK):
  """R f32[H, d_h]: the token's per-head rows minus their mean over heads."""
  q = q_HxK.astype(jnp.float32)
  return q - q.mean(axis=0, keepdims=True)


def gram_dual(q_HxK):
  """f32[H, H] = R R^T / H."""
  r = centred(q_HxK)
  return jnp.einsum("hk,gk->hg", r, r) / r.shape[0]


def gram_primal(q_HxK):
  """f32[d_h, d_h] = R^T R / H: same non-zero eigenvalues as the dual, d_h - H + 1 more zeros."""
  r = centred(q_HxK)
  return jnp.einsum("hk,hl->kl", r, r) / r.shape[0]


def spectrum(q_HxK, variant: str = "dual"):
  """Ascending eigenvalues of the dual (f32[H]) or primal (f32[d_h]) Gram, not clamped."""
  gram = {"dual": gram_dual, "primal": gram_primal}[variant]
  return jnp.linalg.eigvalsh(gram(q_HxK))


def entropy_from_spectrum(lam, num_heads: int):
  """S = -Σ λ ln λ / ln H with λ clamped at EPS. Both variants use ln H (the dual's size), so
  their scores agree; the reference's ln(Gram size) for the primal would differ by a constant."""
  lam = jnp.maximum(lam, EPS)
  return -(lam * jnp.log(lam)).sum(-1) / jnp.log(float(num_heads))


def token_entropy(q_NxHxK, variant: str = "dual"):
  """f32[N]: the §2.1 score of every token from its queries f[N, H, d_h]."""
  lam = jax.vmap(lambda q: spectrum(q, variant))(q_NxHxK)
  return entropy_from_spectrum(lam, q_NxHxK.shape[1])


def score(state_1: TokenState, aux_1: dict, key, k: int):
  """f32[N], higher = keep; -inf on non-visual slots. aux_1["queries"]: f[N, H, d_h]."""
  del key, k  # deterministic, and top-k selection happens in `select`
  s = token_entropy(aux_1["queries"])
  return jnp.where(state_1.visual & state_1.valid, s, -jnp.inf)
