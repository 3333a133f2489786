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
from jaxmm.models import clip, llama, segments
from jaxmm.models.outputs import CausalLMOutput
from jaxmm.pruning import schedule as schedule_lib
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


def token_state(cfg: LlavaConfig, params, input_ids_BxT, pixel_values, mask_BxT, pos_BxT):
  """The TokenState entering the decoder: merged embeddings, positions, masks, origins."""
  b, t = input_ids_BxT.shape
  return TokenState(hidden=input_embeddings(cfg, params, input_ids_BxT, pixel_values),
                    positions=pos_BxT, valid=mask_BxT,
                    visual=(input_ids_BxT == cfg.image_token_id) & mask_BxT,
                    origin=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


def captured_forward(cfg: LlavaConfig, params, input_ids, pixel_values, mask, positions, capture):
  """Unpruned forward that also returns `capture`'s per-layer stacks (see analysis.capture)."""
  x = input_embeddings(cfg, params, input_ids, pixel_values)
  slots = jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape)
  h, _, ys = llama.run_layers(cfg.text, params["llm"]["layers"], x, positions,
                              llama.attention_mask(slots, mask), stack=capture.names())
  if "hidden" in ys:
    ys["hidden"] = jnp.concatenate([x[None], ys["hidden"]], axis=0)
  ys["visual"] = (input_ids == cfg.image_token_id) & mask
  return CausalLMOutput(logits=llama.lm_logits(cfg.text, params["llm"], h), captured=ys)


@functools.partial(jax.jit, static_argnames=("cfg", "schedule", "capture"))
def _forward(cfg, params, input_ids, pixel_values, mask, positions, keys, schedule, capture=None):
  if capture is not None:
    return captured_forward(cfg, params, input_ids, pixel_values, mask, positions, capture)
  if not schedule:
    x = input_embeddings(cfg, params, input_ids, pixel_values)
    return CausalLMOutput(logits=llama.decode_embeds(cfg.text, params["llm"], x, mask, positions))
  state = token_state(cfg, params, input_ids, pixel_values, mask, positions)
  segs, kept = segments.prefill(cfg.text, params["llm"]["layers"], state, schedule, keys)
  final = segs[-1].state
  return CausalLMOutput(logits=llama.lm_logits(cfg.text, params["llm"], final.hidden), kept=kept,
                        origin=final.origin)


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


def check_inputs(cfg: LlavaConfig, ids, pixel_values, schedule):
  """Host-side checks; returns (pixel values or None, the schedule resolved to static counts)."""
  px = check_images(cfg, ids, pixel_values)
  if not schedule:
    return px, ()
  if isinstance(schedule, str):
    schedule = schedule_lib.parse(schedule)
  vis = np.sum(np.asarray(ids) == cfg.image_token_id, axis=1)
  if vis.min() != vis.max():
    raise InputError(f"pruning needs the same number of visual tokens in every example, got {vis.tolist()}")
  return px, schedule_lib.resolve(schedule, int(vis[0]), cfg.text.num_layers)


def forward(cfg: LlavaConfig, params, *, input_ids, pixel_values=None, attention_mask=None,
            position_ids=None, schedule=None, seed: int = 0, example_ids=None, capture=None):
  """input_ids i32[B, T] with `cfg.num_image_tokens` placeholders per image; pixel_values
  f32[images, C, H, W]; attention_mask {0,1}[B, T].

  Returns CausalLMOutput(logits f32[B, T, V]). With a pruning `schedule` (text such as
  "entropy@2:98" or a parsed one; random pruning draws from fold_in(PRNGKey(seed), example id),
  `example_ids` defaulting to the row numbers) the logits cover the T' tokens
  left after the last stage, `origin` i32[B, T'] gives their index in the unpruned sequence and
  `kept` holds, per stage, the original indices i32[B, k] of the kept visual tokens.
  `capture`: an `analysis.capture.Capture` (unpruned only) fills `captured`; see that module."""
  ids, mask, pos = inputs_lib.text_inputs(input_ids, attention_mask, position_ids)
  px, sched = check_inputs(cfg, ids, pixel_values, schedule)
  if capture is not None and sched:
    raise InputError("capture runs the unpruned forward; it cannot be combined with a schedule")
  keys = inputs_lib.example_keys(seed, ids.shape[0], example_ids)
  if capture is None:  # the call (and its jit cache entry) is exactly the plain forward's
    return _forward(cfg, params, ids, px, mask, pos, keys, sched)
  return _forward(cfg, params, ids, px, mask, pos, keys, sched, capture)
