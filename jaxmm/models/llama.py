"""LLaMA decoder: embeddings, a scanned stack of decoder layers, final norm and LM head.

The same functions serve the text-only `llama` family and the language model inside LLaVA.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmm import inputs as inputs_lib
from jaxmm.config import LlamaConfig
from jaxmm.layers import rope
from jaxmm.layers.attention import CausalSelfAttention
from jaxmm.layers.mlp import SwiGLU
from jaxmm.layers.norms import RMSNorm
from jaxmm.models.outputs import CausalLMOutput

Config = LlamaConfig


class DecoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). `capture`: see attention."""
  cfg: LlamaConfig
  capture: tuple = ()

  @nn.compact
  def __call__(self, x_BxTxD, sin_cos, mask_BxTxS, cache=None):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    attn = CausalSelfAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias,
                               dt, self.capture, name="attn")
    a, cache = attn(RMSNorm(cfg.rms_norm_eps, name="attn_norm")(x_BxTxD), sin_cos, mask_BxTxS, cache)
    x = x_BxTxD + a
    mlp = SwiGLU(cfg.intermediate_size, cfg.mlp_bias, dt, name="mlp")
    return x + mlp(RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(x)), cache


def embed(cfg: LlamaConfig, params, input_ids_BxT):
  """f[B, T, D] token embeddings (ids outside the vocabulary, e.g. placeholders, are clamped)."""
  ids = jnp.clip(input_ids_BxT, 0, cfg.vocab_size - 1)
  return params["embed"][ids].astype(cfg.dtype)


def attention_mask(q_slot_BxT, kv_valid_BxS):
  """bool[B, T, S]: a query sees valid key slots at or before its own slot (causal by slot)."""
  s = jnp.arange(kv_valid_BxS.shape[1])
  return (s[None, None, :] <= q_slot_BxT[:, :, None]) & kv_valid_BxS[:, None, :]


def run_layers(cfg: LlamaConfig, layers_p, x_BxTxD, positions_BxT, mask_BxTxS, kv=None,
               write_idx=0):
  """Runs a stacked slice of decoder layers with `lax.scan`.

  kv: None, or (k, v) f[L, B, S, G, K] caches of these layers; the new keys/values are written at
  slot `write_idx`. Returns (x f[B, T, D], kv).
  """
  sc = rope.sin_cos(positions_BxT, rope.inv_frequencies(cfg))
  layer = DecoderLayer(cfg)

  def body(x, xs):
    p, c = xs
    c = None if c is None else (c[0], c[1], write_idx)
    y, c = layer.apply({"params": p}, x, sc, mask_BxTxS, c)
    return y, (None if c is None else c[:2])

  return jax.lax.scan(body, x_BxTxD, (layers_p, kv))


def lm_logits(cfg: LlamaConfig, params, h_BxTxD):
  """Final RMSNorm and LM head (tied to the embeddings when configured): f32[B, T, V]."""
  h = RMSNorm(cfg.rms_norm_eps).apply({"params": params["norm"]}, h_BxTxD)
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def decode_embeds(cfg: LlamaConfig, params, x_BxTxD, valid_BxT, positions_BxT):
  """Full-sequence forward from input embeddings to logits (no cache)."""
  slots = jnp.broadcast_to(jnp.arange(x_BxTxD.shape[1]), valid_BxT.shape)
  h, _ = run_layers(cfg, params["layers"], x_BxTxD, positions_BxT, attention_mask(slots, valid_BxT))
  return lm_logits(cfg, params, h)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(cfg, params, input_ids, attention_mask, position_ids):
  return CausalLMOutput(logits=decode_embeds(cfg, params, embed(cfg, params, input_ids),
                                             attention_mask, position_ids))


def forward(cfg: LlamaConfig, params, *, input_ids, attention_mask=None, position_ids=None):
  """Text-only forward. input_ids i32[B, T]; attention_mask {0,1}[B, T] (left or right padding);
  position_ids default to the count of valid tokens before each position. -> CausalLMOutput."""
  ids, mask, pos = inputs_lib.text_inputs(input_ids, attention_mask, position_ids)
  return _forward(cfg, params, ids, mask, pos)
