"""LLaMA decoder: embeddings, a scanned stack of decoder layers, final norm and LM head.

The same functions serve the text-only `llama` family and the language model inside LLaVA.
`Decoder` is this module's implementation of the decoder interface (`models.decoder`); the
module itself is the text-only `llama` family (`models.family`).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm import sharding
from jaxmm.config import LlamaConfig
from jaxmm.layers import rope
from jaxmm.layers.attention import CausalSelfAttention
from jaxmm.layers.mlp import SwiGLU
from jaxmm.layers.norms import RMSNorm
from jaxmm.models import core
from jaxmm.models import decoder as decoder_lib
from jaxmm.models.decoder import LayersOut, attention_mask  # noqa: F401  (re-exported)
from jaxmm.models.family import Prepared
from jaxmm.pruning.state import TokenState

Config = LlamaConfig
NAME = "llama"
INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})


class DecoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). `capture`: see attention.
  `cfg`: a LlamaConfig, or any config with its fields (Qwen2's: q/k/v biases, no o bias)."""
  cfg: LlamaConfig
  capture: tuple = ()

  @nn.compact
  def __call__(self, x_BxTxD, sin_cos, mask_BxTxS, cache=None):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    # On a mesh the residual stream stays split by batch: XLA gathers split weights to it.
    x_BxTxD = sharding.constrain(x_BxTxD, "batch")
    attn = CausalSelfAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias,
                               dt, self.capture, cfg.o_bias, cfg.attention, name="attn")
    a, cache = attn(RMSNorm(cfg.rms_norm_eps, name="attn_norm")(x_BxTxD), sin_cos, mask_BxTxS, cache)
    x = x_BxTxD + a
    mlp = SwiGLU(cfg.intermediate_size, cfg.mlp_bias, dt, name="mlp")
    return x + mlp(RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(x)), cache


def embed(cfg: LlamaConfig, params, input_ids_BxT):
  """f[B, T, D] token embeddings (ids outside the vocabulary, e.g. placeholders, are clamped)."""
  ids = jnp.clip(input_ids_BxT, 0, cfg.vocab_size - 1)
  return sharding.constrain(params["embed"][ids].astype(cfg.dtype), "batch")


def sin_cos(cfg: LlamaConfig, positions_BxT):
  """The 1-D rotary tables (sin, cos) f32[B, T, head_dim] of integer positions."""
  if positions_BxT.ndim != 2:
    raise ValueError(f"LLaMA takes 1-D positions [B, T], got shape {positions_BxT.shape}")
  return rope.sin_cos(positions_BxT, rope.inv_frequencies(cfg))


def run_layers(cfg: LlamaConfig, layers_p, x_BxTxD, positions_BxT, mask_BxTxS, kv=None,
               write_idx=0, start: int = 0, end: int | None = None, capture: tuple = (),
               stack: tuple = (), tables=None, remat: bool = False) -> LayersOut:
  """Runs decoder layers [start, end) of the stacked `layers_p` with `lax.scan`.

  kv: None, or (k, v) f[end-start, B, S, G, K] caches of these layers; the new keys/values are
  written at slot `write_idx`. `capture` names values of the range's last layer (see
  `decoder.CARRY_CAPTURES`); they ride in the scan carry, overwritten each layer, so the range
  stays one scan. `stack` names per-layer values emitted as scan outputs (f[end-start, ...]):
  "queries" and "hidden" (each layer's output). `tables`: precomputed rotary tables of the
  positions (else computed here). `remat`: recompute each layer's activations in the backward
  pass instead of saving them (see `Decoder.remat`). Returns a `LayersOut`.

  A sub-range is scanned over layer indices, each step reading its layer with a dynamic index,
  rather than over a slice `a[start:end]`: the slice would copy those layers' weights first.
  """
  n = jax.tree.leaves(layers_p)[0].shape[0]
  end = n if end is None else end
  sc = sin_cos(cfg, positions_BxT) if tables is None else tables
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
  body = jax.checkpoint(body) if remat else body
  aux0 = _capture_shapes(cfg, x_BxTxD, mask_BxTxS, capture)
  (x, aux), (kv, ys) = jax.lax.scan(body, (x_BxTxD, aux0), (xs, kv))
  return LayersOut(x=x, kv=kv, last=aux, stacked=ys)


def _capture_shapes(cfg, x_BxTxD, mask_BxTxS, capture) -> dict:
  """Zero initial values of the captures (the carry needs them before the first layer)."""
  b, t, _ = x_BxTxD.shape
  s = mask_BxTxS.shape[-1]
  shapes = {"queries": ((b, t, cfg.num_heads, cfg.head_dim), x_BxTxD.dtype),
            "attn_row": ((b, s), jnp.float32),
            "attn_logp": ((b, cfg.num_heads, t, s), jnp.float32)}
  unknown = set(capture) - set(shapes)
  if unknown:
    raise ValueError(f"unknown capture(s) {sorted(unknown)}; known: {sorted(shapes)}")
  return {k: jnp.zeros(*shapes[k]) for k in capture}


def lm_logits(cfg: LlamaConfig, params, h_BxTxD):
  """Final RMSNorm and LM head (tied to the embeddings when configured): f32[B, T, V]."""
  h = RMSNorm(cfg.rms_norm_eps).apply({"params": params["norm"]}, h_BxTxD)
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def decode_embeds(cfg: LlamaConfig, params, x_BxTxD, valid_BxT, positions_BxT):
  """Full-sequence forward from input embeddings to logits (no cache, no pruning)."""
  out = run_layers(cfg, params["layers"], x_BxTxD, positions_BxT, decoder_lib.causal_mask(valid_BxT))
  return lm_logits(cfg, params, out.x)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """LLaMA's implementation of the decoder interface (`models.decoder`), over `params` =
  {"embed", "layers", "norm"[, "lm_head"]}. Hashable: a static jit argument.

  remat: differentiate through `jax.checkpoint`ed layers (training). Saving each layer's
  attention probabilities f32[B, H, T, S] for the backward pass costs more memory traffic than
  computing them again: the digits-VQA training step took 131 ms instead of 190 on 2 CPU cores.
  """
  cfg: LlamaConfig
  remat: bool = False

  @property
  def num_layers(self) -> int:
    return self.cfg.num_layers

  @property
  def eos_token_ids(self) -> tuple:
    return self.cfg.eos_token_ids

  @property
  def pad_token_id(self) -> int | None:
    return self.cfg.pad_token_id

  def embed(self, params, ids_BxT):
    return embed(self.cfg, params, ids_BxT)

  def rope(self, positions_BxT):
    return sin_cos(self.cfg, positions_BxT)

  def run(self, params, x_BxTxD, positions, mask_BxTxS, kv=None, write_idx=0, start=0, end=None,
          capture=(), stack=()) -> LayersOut:
    return run_layers(self.cfg, params["layers"], x_BxTxD, positions, mask_BxTxS, kv, write_idx,
                      start, end, capture, stack, tables=self.rope(positions),
                      remat=self.remat)

  def logits(self, params, h_BxTxD):
    return lm_logits(self.cfg, params, h_BxTxD)

  def kv_shape(self, batch: int, slots: int) -> tuple:
    return (batch, slots, self.cfg.num_kv_heads, self.cfg.head_dim)


# ---- the text-only `llama` family (models.family) -------------------------------------------------

def decoder(cfg: LlamaConfig) -> Decoder:
  return Decoder(cfg)


def decoder_params(params) -> dict:
  return params


def prepare(cfg: LlamaConfig, inputs: dict) -> Prepared:
  """Host-side checks of text inputs (transformers' names); no visual tokens."""
  ids, mask, pos = inputs_lib.text_inputs(inputs["input_ids"], inputs.get("attention_mask"),
                                          inputs.get("position_ids"))
  inputs_lib.check_vocab(ids, cfg.vocab_size)
  n_valid = np.asarray(mask).sum(axis=1)
  return Prepared({"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                  visual_B=np.zeros_like(n_valid), text_B=n_valid)


def token_state(cfg: LlamaConfig, params, arrays: dict) -> TokenState:
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  return TokenState(hidden=embed(cfg, params, ids), positions=arrays["position_ids"], valid=mask,
                    visual=jnp.zeros_like(mask), origin=jnp.broadcast_to(
                        jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape))


def _stacked(module, key, n: int, *args):
  """Params of `n` independently initialised copies of a Flax layer, stacked on axis 0."""
  return jax.vmap(lambda k: module.init(k, *args)["params"])(jax.random.split(key, n))


def init_params(cfg: LlamaConfig, key) -> dict:
  """Freshly initialised params (embeddings N(0, 0.02), Flax default layers; usable under
  `jax.eval_shape`), the tree that `rules(cfg)` converts into."""
  k_emb, k_layers, k_head = jax.random.split(key, 3)
  d, t = cfg.hidden_size, 4  # any length: only the shapes of the weights matter
  x, sc = jnp.zeros((1, t, d)), (jnp.zeros((1, t, cfg.head_dim)),) * 2
  mask = jnp.ones((1, t, t), bool)
  p = {"embed": jax.random.normal(k_emb, (cfg.vocab_size, d)) * 0.02,
       "layers": _stacked(DecoderLayer(cfg), k_layers, cfg.num_layers, x, sc, mask),
       "norm": {"scale": jnp.ones((d,))}}
  if not cfg.tie_word_embeddings:
    p["lm_head"] = {"kernel": jax.random.normal(k_head, (d, cfg.vocab_size)) * d ** -0.5}
  return p


def rules(cfg: LlamaConfig) -> list:
  """The converter's name table (transformers' LlamaForCausalLM names)."""
  from jaxmm.converters.llava import llama_rules  # converters import the models, not the reverse
  return llama_rules(cfg, "model.", "lm_head.weight")


def forward(cfg: LlamaConfig, params, **inputs):
  """Text-only forward. input_ids i32[B, T]; attention_mask {0,1}[B, T] (left or right padding);
  position_ids default to the count of valid tokens before each position. -> CausalLMOutput."""
  return core.forward(NAME, cfg, params, **inputs)
