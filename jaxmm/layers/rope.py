"""Rotary position embeddings (1-D), in the `rotate_half` layout transformers uses."""
import math

import jax.numpy as jnp
import numpy as np


def inv_frequencies(cfg) -> np.ndarray:
  """Inverse frequencies f32[head_dim/2] for rope_type default | linear | llama3."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  if cfg.rope_type == "linear":
    return (inv / cfg.rope_factor).astype(np.float32)
  if cfg.rope_type == "llama3":
    return _llama3(inv, cfg)
  return inv.astype(np.float32)


def _llama3(inv: np.ndarray, cfg) -> np.ndarray:
  """Llama-3 frequency-dependent scaling with a smooth band between low and high frequencies."""
  old = cfg.rope_original_max_positions
  low_wl, high_wl = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wl, inv / cfg.rope_factor, inv)
  smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
  medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def sin_cos(positions_BxT, inv_freq):
  """f32[B, T, head_dim] sin and cos tables for integer positions."""
  freqs = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x_BxTxHxK, sin_BxTxK, cos_BxTxK):
  """Rotates each head of x; the same rotation for every head of a token."""
  half = x_BxTxHxK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxHxK[..., half:], x_BxTxHxK[..., :half]], axis=-1)
  sin, cos = sin_BxTxK[:, :, None, :], cos_BxTxK[:, :, None, :]
  out = x_BxTxHxK.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x_BxTxHxK.dtype)
