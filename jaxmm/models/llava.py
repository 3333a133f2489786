"""LLaVA-1.5: CLIP vision tower -> 2-layer GELU MLP projector -> LLaMA decoder.

Image features replace the image-placeholder tokens of `input_ids`, in order, over the whole
batch (transformers' `masked_scatter` semantics).
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm import sharding
from jaxmm.config import LlavaConfig
from jaxmm.errors import InputError
from jaxmm.layers.mlp import Mlp
from jaxmm.models import clip, core, llama
from jaxmm.models import family
from jaxmm.models.family import Prepared
from jaxmm.pruning.state import TokenState

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
  return sharding.constrain(proj.apply({"params": params["projector"]}, feats), "batch")


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


def token_state(cfg: LlavaConfig, params, arrays: dict) -> TokenState:
  """The TokenState entering the decoder: merged embeddings, positions, masks, origins."""
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  b, t = ids.shape
  return TokenState(hidden=input_embeddings(cfg, params, ids, arrays.get("pixel_values")),
                    positions=arrays["position_ids"], valid=mask,
                    visual=(ids == cfg.image_token_id) & mask,
                    origin=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


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
  inputs_lib.check_finite(px, "pixel_values")
  if n_tok != px.shape[0] * cfg.num_image_tokens:
    raise InputError(f"input_ids hold {n_tok} image tokens, but {px.shape[0]} image(s) give "
                     f"{px.shape[0] * cfg.num_image_tokens} features ({cfg.num_image_tokens} each)")
  return px


# ---- the `llava` family (models.family) -----------------------------------------------------------

NAME = "llava"
INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "pixel_values"})


def prepare(cfg: LlavaConfig, inputs: dict) -> Prepared:
  """Host-side checks; each example may hold any number of images (0, 1, 2, ...), so its
  visual-token count is its own (`num_image_tokens` per image)."""
  ids, mask, pos = inputs_lib.text_inputs(inputs["input_ids"], inputs.get("attention_mask"),
                                          inputs.get("position_ids"))
  inputs_lib.check_vocab(ids, cfg.text.vocab_size, allowed=(cfg.image_token_id,))
  px = check_images(cfg, ids, inputs.get("pixel_values"))
  visual = (np.asarray(ids) == cfg.image_token_id) & np.asarray(mask)
  n_vis = visual.sum(axis=1)
  return Prepared({"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                   "pixel_values": px}, visual_B=n_vis, text_B=np.asarray(mask).sum(1) - n_vis)


def visual_grids(cfg: LlavaConfig, inputs: dict) -> list[list[np.ndarray]]:
  """Per example, one i32[side, side] grid of sequence slots per image: its patch features in
  raster order (the CLS feature of the "full" strategy belongs to no grid). `inputs` as
  `prepare` takes them (checked)."""
  ids = np.asarray(inputs["input_ids"])
  side = cfg.vision.image_size // cfg.vision.patch_size
  n = cfg.num_image_tokens
  placeholder = ids == cfg.image_token_id
  runs = family.image_runs(placeholder, [n] * (int(placeholder.sum()) // n))
  return family.by_example(ids.shape[0], [(b, s[n - side * side:].reshape(side, side))
                                          for b, s in runs])


def decoder(cfg: LlavaConfig) -> llama.Decoder:
  return llama.Decoder(cfg.text)


def decoder_params(params) -> dict:
  return params["llm"]


def init_params(cfg: LlavaConfig, key, pos_init: str = "random", llm=None) -> dict:
  """A freshly initialised LLaVA params tree (usable under `jax.eval_shape`): the CLIP tower
  (`clip.init_params`), the projector and the LLaMA decoder (`llama.init_params`, or the
  given `llm` params, e.g. a pretrained decoder to keep frozen)."""
  k_v, k_p, k_t = jax.random.split(key, 3)
  d_in, d = cfg.vision.hidden_size * len(cfg.feature_layers), cfg.text.hidden_size
  proj = Mlp(d, d, cfg.projector_hidden_act, cfg.multimodal_projector_bias)
  return {"vision": clip.init_params(cfg.vision, k_v, pos_init),
          "projector": proj.init(k_p, jnp.zeros((1, d_in)))["params"],
          "llm": llama.init_params(cfg.text, k_t) if llm is None else llm}


def rules(cfg: LlavaConfig) -> list:
  """The converter's name table (the transformers-5 file layout)."""
  from jaxmm.converters.llava import llava_rules  # converters import the models, not the reverse
  return llava_rules(cfg, "hf")


def forward(cfg: LlavaConfig, params, **inputs):
  """input_ids i32[B, T] with `cfg.num_image_tokens` placeholders per image (any number of
  images per example); pixel_values f32[images, C, H, W]; attention_mask {0,1}[B, T].
  See `models.core.forward` for schedule, seed, example_ids and capture."""
  return core.forward(NAME, cfg, params, **inputs)
