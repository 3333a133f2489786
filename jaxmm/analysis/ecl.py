"""Entropy Collapse Layer (pruning.md §2.2): two entropy curves over the decoder's layers.

- `mean_token_entropy`: S̄_l, the §2.1 token-wise matrix entropy of layer l's queries
  (pre-RoPE, which §2.1 shows is equivalent), averaged over the visual tokens.
- `global_entropy`: the von Neumann entropy of the visual block of the hidden states entering
  layer l (rows L2-normalised, centred over the visual tokens, dual N_v x N_v Gram K,
  ρ = K / tr K, S = -Σ λ ln λ / ln N_v).
- `ecl_layer`: K* = argmax_{1 <= l <= L/2} (S̄_{l-1} - S̄_l), the largest one-step drop.

Curves are per example; average them over a calibration set before applying the rule.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.pruning.entropy import entropy_from_spectrum, spectrum, token_entropy

EPS = 1e-10   # eigenvalues of ρ at or below this count as zero (0 ln 0 = 0)


def mean_token_entropy(queries_LxTxHxK, visual_T):
  """f32[L]: per layer, the mean §2.1 entropy over the visual tokens of one example."""
  w = visual_T.astype(jnp.float32)
  s_LxT = jax.vmap(token_entropy)(queries_LxTxHxK)
  return (s_LxT * w).sum(-1) / w.sum()


def normalised_token_entropy(q_HxK):
  """f32[]: the §2.1 entropy of the dual Gram divided by its trace (a density matrix), which
  does not depend on the query's norm, unlike the reference's un-normalised score."""
  lam = jnp.maximum(spectrum(q_HxK), 0.0)
  return entropy_from_spectrum(lam / jnp.maximum(lam.sum(), 1e-30), q_HxK.shape[0])


@jax.jit
def mean_normalised_entropy(queries_LxTxHxK, visual_T):
  """f32[L]: per layer, the mean trace-normalised token entropy over the visual tokens."""
  w = visual_T.astype(jnp.float32)
  s_LxT = jax.vmap(jax.vmap(normalised_token_entropy))(queries_LxTxHxK)
  return (s_LxT * w).sum(-1) / w.sum()


def von_neumann(z_TxD, visual_T):
  """f32[]: the global entropy of the visual rows of z (other rows are ignored)."""
  w = visual_T.astype(jnp.float32)
  n = w.sum()
  z = z_TxD.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  z = (z - (z * w[:, None]).sum(0) / n) * w[:, None]   # centred over the visual rows, others 0
  k = z @ z.T                                          # masked rows/cols add only zero eigenvalues
  lam = jnp.linalg.eigvalsh(k / jnp.trace(k))
  ent = jnp.where(lam > EPS, -lam * jnp.log(jnp.where(lam > EPS, lam, 1.0)), 0.0).sum()
  return ent / jnp.log(n)


def global_entropy(hidden_LxTxD, visual_T):
  """f32[L]: `von_neumann` of each layer's hidden states (pass those entering layers 0..L-1)."""
  return jax.vmap(von_neumann, in_axes=(0, None))(hidden_LxTxD, visual_T)


@jax.jit
def curves(hidden_LxTxD, queries_LxTxHxK, visual_T):
  """(S̄ f32[L], S_glob f32[L]) of one example; hidden = captured hidden[:L] (entering layer l)."""
  return mean_token_entropy(queries_LxTxHxK, visual_T), global_entropy(hidden_LxTxD, visual_T)


def ecl_layer(mean_entropy_L) -> int:
  """K* = argmax over 1 <= l <= L/2 of S̄_{l-1} - S̄_l (the first such l on ties)."""
  s = np.asarray(mean_entropy_L, np.float64)
  top = max(1, len(s) // 2)
  drops = s[:top] - s[1:top + 1]
  return int(np.argmax(drops)) + 1
