"""BERT encoder (post-LN transformer with absolute positions and a tanh pooler).

Params tree (what `converters/bert.py` writes; the encoder layers carry a leading layer axis):
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/norm
  layers/attention/{query,key,value,out}/{kernel,bias}, layers/attention_norm/{scale,bias}
  layers/mlp/{up,down}/{kernel,bias}, layers/mlp_norm/{scale,bias}
  pooler/{kernel,bias}
Dropout runs only when `forward` gets a `dropout_rng` (training); without it the forward is
deterministic, which is what parity tests and evaluation use.
"""
import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxmm import config as config_lib
from jaxmm.config import check_keys, require
from jaxmm.errors import ConfigError, InputError
from jaxmm.layers.mlp import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class Config(config_lib.Serializable):
  """BERT hyper-parameters (transformers' `BertConfig` with our field names)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  dtype: str = "float32"            # activation / compute dtype

  @classmethod
  def from_hf(cls, d: dict) -> "Config":
    """Maps a transformers BERT `config.json`; rejects keys whose math is not implemented."""
    # Generic bookkeeping lists these as ignorable, but for an encoder they change the graph.
    require("bert", "model_type", d.get("model_type", "bert"), ("bert",))
    require("bert", "position_embedding_type", d.get("position_embedding_type", "absolute"),
            ("absolute",))
    require("bert", "is_decoder", bool(d.get("is_decoder", False)), (False,))
    require("bert", "add_cross_attention", bool(d.get("add_cross_attention", False)), (False,))
    require("bert", "hidden_act", d.get("hidden_act", "gelu"), tuple(ACTIVATIONS))
    known = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
             "layer_norm_eps", "pad_token_id", "hidden_dropout_prob",
             "attention_probs_dropout_prob", "position_embedding_type", "classifier_dropout",
             "bos_token_id", "eos_token_id", "tie_word_embeddings", "gradient_checkpointing"}
    check_keys("bert", d, known)
    if d["hidden_size"] % d["num_attention_heads"]:
      raise ConfigError("bert config: hidden_size must be a multiple of num_attention_heads")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
               intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
               max_position_embeddings=d.get("max_position_embeddings", 512),
               type_vocab_size=d.get("type_vocab_size", 2),
               layer_norm_eps=d.get("layer_norm_eps", 1e-12),
               pad_token_id=d.get("pad_token_id") or 0,
               hidden_dropout=d.get("hidden_dropout_prob", 0.1),
               attention_dropout=d.get("attention_probs_dropout_prob", 0.1))


@flax.struct.dataclass
class BertOutput:
  """last_hidden_state f[B, L, D]; pooler_output f[B, D] = tanh(dense(h[:, 0]))."""
  last_hidden_state: jax.Array
  pooler_output: jax.Array


class SelfAttention(nn.Module):
  """Bidirectional multi-head attention over valid keys; dropout on the probabilities."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL, deterministic: bool):
    cfg, (b, l, d) = self.cfg, x_BxLxD.shape
    dt = jnp.dtype(cfg.dtype)
    heads = lambda name: nn.Dense(d, dtype=dt, name=name)(x_BxLxD).reshape(b, l, cfg.num_heads, -1)
    q, k, v = heads("query"), heads("key"), heads("value")
    s_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    s_BxHxLxL = s_BxHxLxL * (d // cfg.num_heads) ** -0.5
    # Only keys are masked, as in transformers; padded query rows still get (ignored) outputs.
    s_BxHxLxL = jnp.where(valid_BxL[:, None, None, :], s_BxHxLxL, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(dt)
    p = nn.Dropout(cfg.attention_dropout)(p, deterministic=deterministic)
    out = jnp.einsum("bhqs,bshk->bqhk", p, v).reshape(b, l, d)
    return nn.Dense(d, dtype=dt, name="out")(out)


class FeedForward(nn.Module):
  """down(act(up(x)))."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    h = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=dt, name="up")(x_BxLxD))
    return nn.Dense(cfg.hidden_size, dtype=dt, name="down")(h)


class EncoderLayer(nn.Module):
  """Post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x)))."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL, deterministic: bool):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                                     name=name)
    a = SelfAttention(cfg, name="attention")(x_BxLxD, valid_BxL, deterministic)
    x = norm("attention_norm")(x_BxLxD + drop(a))
    return norm("mlp_norm")(x + drop(FeedForward(cfg, name="mlp")(x)))


class Embeddings(nn.Module):
  """word + absolute position + token type embeddings, LayerNorm, dropout."""
  cfg: Config

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, deterministic: bool):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dt, name=name)
    pos_L = jnp.arange(ids_BxL.shape[1])
    x = (embed(cfg.vocab_size, "word_embeddings")(ids_BxL)
         + embed(cfg.max_position_embeddings, "position_embeddings")(pos_L)[None]
         + embed(cfg.type_vocab_size, "token_type_embeddings")(type_ids_BxL))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="norm")(x)
    return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


def _rngs(key):
  return None if key is None else {"dropout": key}


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: Config, params, *, input_ids, attention_mask, token_type_ids=None,
            dropout_rng=None) -> BertOutput:
  """input_ids i32[B, L], attention_mask [B, L] (1 = real token) -> BertOutput.

  `dropout_rng`: a PRNG key turns on BERT's dropouts (training); None is inference.
  """
  if input_ids.shape[1] > cfg.max_position_embeddings:   # nn.Embed would silently clamp
    raise InputError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                     f"{cfg.max_position_embeddings}")
  det = dropout_rng is None
  keys = (None,) * 3 if det else tuple(jax.random.split(dropout_rng, 3))
  type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
  x = Embeddings(cfg).apply({"params": params["embeddings"]}, input_ids, type_ids, det,
                            rngs=_rngs(keys[0]))
  valid_BxL = attention_mask.astype(bool)
  layer = EncoderLayer(cfg)
  layer_keys = None if det else jax.random.split(keys[1], cfg.num_layers)

  def body(x, xs):
    p, key = xs
    return layer.apply({"params": p}, x, valid_BxL, det, rngs=_rngs(key)), None

  x, _ = jax.lax.scan(body, x, (params["layers"], layer_keys))
  pooled = jnp.tanh(x[:, 0] @ params["pooler"]["kernel"].astype(x.dtype)
                    + params["pooler"]["bias"].astype(x.dtype))
  return BertOutput(last_hidden_state=x, pooler_output=pooled)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: Config, key) -> dict:
  """Random params in the stored layout (BERT's N(0, 0.02) weights, zero biases, unit norms)."""
  k_emb, k_layers, k_pool = jax.random.split(key, 3)
  l = 4
  ids = jnp.zeros((1, l), jnp.int32)
  normal = lambda k, shape: 0.02 * jax.random.normal(k, shape, jnp.float32)
  emb = Embeddings(cfg).init(k_emb, ids, ids, True)["params"]
  emb = jax.tree.map(lambda a, k: normal(k, a.shape) if a.ndim == 2 else a, emb,
                     _split_like(k_emb, emb))

  def one_layer(k):
    p = EncoderLayer(cfg).init(k, jnp.zeros((1, l, cfg.hidden_size)), jnp.ones((1, l), bool),
                               True)["params"]
    return jax.tree.map(lambda a, kk: normal(kk, a.shape) if a.ndim == 2 else a, p,
                        _split_like(k, p))

  layers = jax.vmap(one_layer)(jax.random.split(k_layers, cfg.num_layers))
  pooler = {"kernel": normal(k_pool, (cfg.hidden_size, cfg.hidden_size)),
            "bias": jnp.zeros((cfg.hidden_size,), jnp.float32)}
  return {"embeddings": emb, "layers": layers, "pooler": pooler}


def _split_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
