"""CLIP ViT vision tower (pre-LN transformer with a class token and learned positions)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import sharding
from jaxmm.config import ClipVisionConfig
from jaxmm.errors import ConfigError
from jaxmm.layers.attention import BidirectionalAttention
from jaxmm.layers.mlp import Mlp

Config = ClipVisionConfig


class EncoderLayer(nn.Module):
  cfg: ClipVisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg = self.cfg
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    x_BxNxD = sharding.constrain(x_BxNxD, "batch")   # on a mesh: images split, weights gathered
    x = x_BxNxD + BidirectionalAttention(cfg.num_heads, self.dtype, name="attn")(ln("ln1")(x_BxNxD))
    mlp = Mlp(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, dtype=self.dtype, name="mlp")
    return x + mlp(ln("ln2")(x))


def _layer_norm(cfg, p, x, dtype):
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype).apply({"params": p}, x)


def embed(cfg: ClipVisionConfig, params, pixels_BxCxHxW, dtype=jnp.float32):
  """Patch + class + position embeddings, then the pre-LayerNorm: f[B, 1+Np, Dv].

  The stride-P convolution is a matmul over (row, col, channel)-ordered patches, which is
  exactly the HWIO kernel flattened.
  """
  b, c, h, w = pixels_BxCxHxW.shape
  p = cfg.patch_size
  x = pixels_BxCxHxW.astype(dtype).reshape(b, c, h // p, p, w // p, p)
  x = x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
  kernel = params["patch_embed"]["kernel"].astype(dtype).reshape(p * p * c, -1)
  patches = x @ kernel
  cls = jnp.broadcast_to(params["class_embed"].astype(dtype), (b, 1, patches.shape[-1]))
  x = jnp.concatenate([cls, patches], axis=1) + params["pos_embed"].astype(dtype)[None]
  return _layer_norm(cfg, params["pre_ln"], x, dtype)


def hidden_states(cfg: ClipVisionConfig, params, pixels_BxCxHxW, upto: int, dtype=jnp.float32):
  """f[upto+1, B, 1+Np, Dv]: the embedding output and the outputs of layers 0..upto-1.

  Index i is transformers' `hidden_states[i]`; only the layers needed are run.
  """
  x = embed(cfg, params, pixels_BxCxHxW, dtype)
  layer = EncoderLayer(cfg, dtype)
  layers_p = jax.tree.map(lambda a: a[:upto], params["layers"])

  def body(x, p):
    y = layer.apply({"params": p}, x)
    return y, y

  _, ys = jax.lax.scan(body, x, layers_p)
  return jnp.concatenate([x[None], ys], axis=0)


def sincos_positions(side: int, d: int) -> np.ndarray:
  """f32[1 + side*side, d]: 2-D sine/cosine embeddings of a patch grid (zeros for the CLS slot).

  A quarter of the channels each for sin(row), cos(row), sin(col), cos(col), at frequencies
  1 / 100^(i / (d/4)); every patch gets a distinct unit-scale code that the ViT can read from
  the first step, which random 0.02-scale embeddings do not give it.
  """
  q = d // 4
  om = 1.0 / 100.0 ** (np.arange(q) / q)
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  r, c = rows.reshape(-1, 1) * om, cols.reshape(-1, 1) * om
  pe = np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)
  pe = np.pad(pe, ((1, 0), (0, d - 4 * q)))
  return pe.astype(np.float32)


def init_params(cfg: ClipVisionConfig, key, pos_init: str = "random") -> dict:
  """Fresh tower params (usable under `jax.eval_shape`); position embeddings N(0, 0.02)
  ("random") or the 2-D `sincos_positions` ("sincos")."""
  k_patch, k_pos, k_layers = jax.random.split(key, 3)
  d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
  x = jnp.zeros((1, cfg.num_patches + 1, d))
  if pos_init == "sincos":
    pos = jnp.asarray(sincos_positions(cfg.image_size // p, d))
  elif pos_init == "random":
    pos = jax.random.normal(k_pos, (cfg.num_patches + 1, d)) * 0.02
  else:
    raise ConfigError(f"pos_init must be 'random' or 'sincos', got {pos_init!r}")
  layers = jax.vmap(lambda k: EncoderLayer(cfg).init(k, x)["params"])(
      jax.random.split(k_layers, cfg.num_layers))
  return {"patch_embed": {"kernel": jax.random.normal(k_patch, (p, p, c, d)) * (p * p * c) ** -0.5},
          "class_embed": jnp.zeros((d,)),
          "pos_embed": pos,
          "pre_ln": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
          "layers": layers}
