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
               write_idx=0, start: int = 0, end: int | None = None, capture: tuple = (),
               stack: tuple = ()):
  """Runs decoder layers [start, end) of the stacked `layers_p` with `lax.scan`.

  kv: None, or (k, v) f[end-start, B, S, G, K] caches of these layers; the new keys/values are
  written at slot `write_idx`. Returns (x f[B, T, D], kv), or (x, kv, aux) with `capture`: aux
  maps each captured name (see CausalSelfAttention) to its value in the last layer of the range.
  The captures ride in the scan carry, overwritten each layer, so the range stays one scan.
  `stack` names per-layer captures emitted as scan outputs and appended to the result as a dict
  of f[end-start, ...] arrays: "queries" (see CausalSelfAttention) and "hidden" (each layer's
  output f[B, T, D]). With stack=() the scan has no extra outputs.

  A sub-range is scanned over layer indices, each step reading its layer with a dynamic index,
  rather than over a slice `a[start:end]`: the slice would copy those layers' weights first.
  """
  n = jax.tree.leaves(layers_p)[0].shape[0]
  end = n if end is None else end
  sc = rope.sin_cos(positions_BxT, rope.inv_frequencies(cfg))
  layer = DecoderLayer(cfg, capture=tuple(sorted(set(capture) | (set(stack) - {"hidden"}))))

  def body(carry, xs):
    x, _ = carry
    p, c = xs
    if not isinstance(p, dict):  # a layer index into the full stack
      p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, p, keepdims=False), layers_p)
    c = None if c is None else (c[0], c[1], write_idx)
    (y, c), inter = layer.apply({"params": p}, x, sc, mask_BxTxS, c, mutable=["intermediates"])
    sown = inter.get("intermediates", {}).get("attn", {})
    aux = {k: sown[k][0] for k in capture}
    ys = {k: (y if k == "hidden" else sown[k][0]) for k in stack}
    return (y, aux), ((None if c is None else c[:2]), ys)

  xs = layers_p if (start, end) == (0, n) else jnp.arange(start, end)
  aux0 = _capture_shapes(cfg, x_BxTxD, mask_BxTxS, capture)
  (x, aux), (kv, ys) = jax.lax.scan(body, (x_BxTxD, aux0), (xs, kv))
  return (x, kv) + ((aux,) if capture else ()) + ((ys,) if stack else ())


def _capture_shapes(cfg, x_BxTxD, mask_BxTxS, capture) -> dict:
  """Zero initial values of the captures (the carry needs them before the first layer)."""
  b, t, _ = x_BxTxD.shape
  shapes = {"queries": ((b, t, cfg.num_heads, cfg.head_dim), x_BxTxD.dtype),
            "attn_row": ((b, mask_BxTxS.shape[-1]), jnp.float32)}
  return {k: jnp.zeros(*shapes[k]) for k in capture}


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
