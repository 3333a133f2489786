"""Qwen2 decoder (the language model of Qwen2-VL / Qwen2.5-VL) on the decoder interface.

LLaMA's structure (pre-norm RMSNorm blocks, GQA attention, SwiGLU, a scanned layer stack), so
LLaMA's layer, scan, embedding, head and init run it (`Qwen2Config` states the bias layout:
q/k/v biases, none on o). What differs is the rotary embedding, multimodal (M-RoPE): positions
are i32[B, T, 3] (temporal, height, width) and the head_dim/2 rotary frequencies are split into
`mrope_section` chunks, chunk i taking its angle from axis i % 3. For text tokens the three axes
agree and M-RoPE is plain 1-D RoPE.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxmm.config import Qwen2Config
from jaxmm.models import llama


def inv_frequencies(cfg: Qwen2Config) -> np.ndarray:
  """f32[head_dim/2] inverse frequencies (transformers' default rope)."""
  dim = cfg.head_dim
  return (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32)
                                    / dim))).astype(np.float32)


def mrope_axes(cfg: Qwen2Config) -> np.ndarray:
  """i32[head_dim/2]: the position axis (0 t, 1 h, 2 w) each rotary frequency reads."""
  axes = [np.full(n, i % 3) for i, n in enumerate(cfg.mrope_section)]
  return np.concatenate(axes).astype(np.int32)


def sin_cos(cfg: Qwen2Config, positions):
  """M-RoPE tables (sin, cos) f32[B, T, head_dim] of positions i32[B, T, 3] (or [B, T], the
  same position on every axis)."""
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions[..., None], positions.shape + (3,))
  if positions.ndim != 3 or positions.shape[-1] != 3:
    raise ValueError(f"Qwen2 takes M-RoPE positions [B, T, 3], got shape {positions.shape}")
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_frequencies(cfg))  # B,T,3,F
  axes = jnp.asarray(mrope_axes(cfg))
  f = jnp.take_along_axis(freqs, axes[None, None, None, :], axis=2)[:, :, 0]
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.sin(emb), jnp.cos(emb)


@dataclasses.dataclass(frozen=True)
class Decoder(llama.Decoder):
  """Qwen2's implementation of the decoder interface (`models.decoder`): LLaMA's, with M-RoPE
  tables from positions i32[B, T, 3]. Hashable."""
  cfg: Qwen2Config

  def rope(self, positions):
    return sin_cos(self.cfg, positions)


def embed(cfg: Qwen2Config, params, input_ids_BxT):
  """f[B, T, D] token embeddings (`llama.embed`)."""
  return llama.embed(cfg, params, input_ids_BxT)


def init_params(cfg: Qwen2Config, key) -> dict:
  """Fresh decoder params (`llama.init_params`; usable under `jax.eval_shape`)."""
  return llama.init_params(cfg, key)
