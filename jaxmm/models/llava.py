"""LLaVA-1.5: CLIP vision tower -> 2-layer GELU MLP projector -> LLaMA decoder.

Image features replace the image-placeholder tokens of `input_ids`, in order, over the whole
batch (transformers' `masked_scatter` semantics).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm.config import LlavaConfig
from jaxmm.errors import InputError
from jaxmm.layers.mlp import Mlp
from jaxmm.models import clip, llama
from jaxmm.models.outputs import CausalLMOutput

Config = LlavaConfig


def image_features(cfg: LlavaConfig, params, pixels_BxCxHxW):
  """Projected visual tokens f[B, Nv, D] from the configured CLIP layer(s) and strategy."""
  dt = jnp.dtype(cfg.text.dtype)
  n = cfg.vision.num_layers
  idx = [l if l >= 0 else n + 1 + l for l in cfg.feature_layers]
  hs = clip.hidden_states(cfg.vision, params["vision"], pixels_BxCxHxW, max(idx), dt)
  feats = jnp.concatenate([hs[i] for i in idx], axis=-1)
  if cfg.vision_feature_select_strategy == "default":
    feats = feats[:, 1:]
  d = cfg.text.hidden_size
  proj = Mlp(d, d, cfg.projector_hidden_act, cfg.multimodal_projector_bias, dt)
  return proj.apply({"params": params["projector"]}, feats)


def merge_image_features(cfg: LlavaConfig, embeds_BxTxD, input_ids_BxT, feats_NxVxD):
  """Scatters image features, flattened over images, into the placeholder positions."""
  is_img = input_ids_BxT == cfg.image_token_id
  flat = feats_NxVxD.reshape(-1, feats_NxVxD.shape[-1]).astype(embeds_BxTxD.dtype)
  order = jnp.cumsum(is_img.reshape(-1)) - 1
  picked = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(embeds_BxTxD.shape)
  return jnp.where(is_img[..., None], picked, embeds_BxTxD)


def input_embeddings(cfg: LlavaConfig, params, input_ids_BxT, pixel_values):
  """Token embeddings with image features merged in (text-only when pixel_values is None)."""
  x = llama.embed(cfg.text, params["llm"], input_ids_BxT)
  if pixel_values is None:
    return x
  return merge_image_features(cfg, x, input_ids_BxT, image_features(cfg, params, pixel_values))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(cfg, params, input_ids, pixel_values, mask, positions):
  x = input_embeddings(cfg, params, input_ids, pixel_values)
  return CausalLMOutput(logits=llama.decode_embeds(cfg.text, params["llm"], x, mask, positions))


def check_images(cfg: LlavaConfig, input_ids, pixel_values):
  """Host-side checks: image size and placeholder count must match the vision config."""
  n_tok = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
  if pixel_values is None:
    if n_tok:
      raise InputError(f"input_ids hold {n_tok} image tokens but no pixel_values were given")
    return None
  px = jnp.asarray(pixel_values)
  v = cfg.vision
  want = (v.num_channels, v.image_size, v.image_size)
  if px.ndim != 4 or tuple(px.shape[1:]) != want:
    raise InputError(f"pixel_values must be [images, {want[0]}, {want[1]}, {want[2]}], "
                     f"got {list(px.shape)}")
  if n_tok != px.shape[0] * cfg.num_image_tokens:
    raise InputError(f"input_ids hold {n_tok} image tokens, but {px.shape[0]} image(s) give "
                     f"{px.shape[0] * cfg.num_image_tokens} features ({cfg.num_image_tokens} each)")
  return px


def forward(cfg: LlavaConfig, params, *, input_ids, pixel_values=None, attention_mask=None,
            position_ids=None):
  """input_ids i32[B, T] with `cfg.num_image_tokens` placeholders per image; pixel_values
  f32[images, C, H, W]; attention_mask {0,1}[B, T]. Returns CausalLMOutput(logits f32[B, T, V])."""
  ids, mask, pos = inputs_lib.text_inputs(input_ids, attention_mask, position_ids)
  px = check_images(cfg, ids, pixel_values)
  return _forward(cfg, params, ids, px, mask, pos)
