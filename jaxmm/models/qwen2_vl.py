"""Qwen2-VL and Qwen2.5-VL (one family, `cfg.model_type` tells them apart): the vision tower
(`qwen2_vl_vision`) -> visual tokens of the decoder width -> the Qwen2 decoder with M-RoPE.

Inputs are what the Qwen processor emits, with transformers' names: input_ids, attention_mask,
pixel_values f[patches, C*T_p*p*p] + image_grid_thw i[images, 3], pixel_values_videos +
video_grid_thw, mm_token_type_ids, second_per_grid_ts (Qwen2.5-VL). Images may have any size
and a batch may mix grids, images and videos: each example has its own visual-token count on
the core's padded capacity. Everything index-like is computed on the host (`prepare`): the
M-RoPE positions exactly as transformers' `get_rope_index`, the packed vision layout, and which
merged feature each placeholder takes.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm.config import Qwen2VLConfig
from jaxmm.errors import InputError
from jaxmm.models import core, qwen2
from jaxmm.models import qwen2_vl_vision as vision
from jaxmm.models import family
from jaxmm.models.family import Prepared
from jaxmm.pruning.state import TokenState

Config = Qwen2VLConfig
NAME = "qwen2_vl"
INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "pixel_values",
                    "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                    "mm_token_type_ids", "second_per_grid_ts"})
KINDS = {1: ("image", "pixel_values", "image_grid_thw"),
         2: ("video", "pixel_values_videos", "video_grid_thw")}


# ---- host-side checks and indices ----------------------------------------------------------

def _visual_input(cfg: Qwen2VLConfig, inputs: dict, kind: int):
  """(pixels f32[P, F], grids i64[N, 3]) of one kind (image / video), checked; or empty."""
  what, px_name, grid_name = KINDS[kind]
  px, grid = inputs.get(px_name), inputs.get(grid_name)
  if px is None and grid is None:
    return np.zeros((0, cfg.vision.patch_dim), np.float32), np.zeros((0, 3), np.int64)
  if px is None or grid is None:
    missing, given = (grid_name, px_name) if grid is None else (px_name, grid_name)
    raise InputError(f"{given} was given without {missing}")
  px, grid = np.asarray(px), np.asarray(grid)
  f = cfg.vision.patch_dim
  if px.ndim != 2 or px.shape[1] != f:
    raise InputError(f"{px_name} must be [patches, {f}] (C * temporal_patch * patch^2), got "
                     f"{list(px.shape)}")
  _check_grid(cfg, grid, grid_name, px.shape[0])
  if not np.isfinite(px).all():
    raise InputError(f"{px_name} holds {int((~np.isfinite(px)).sum())} NaN/inf value(s)")
  return px.astype(np.float32), grid.astype(np.int64)


def _check_grid(cfg: Qwen2VLConfig, grid, name: str, n_patches: int) -> None:
  m = cfg.vision.spatial_merge_size
  if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
    raise InputError(f"{name} must be an integer array [entries, 3] (t, h, w), got "
                     f"{grid.dtype}{list(grid.shape)}")
  if (grid < 1).any() or (grid[:, 1:] % m).any():
    raise InputError(f"{name}: t, h, w must be positive and h, w multiples of the merge size "
                     f"{m}, got {grid.tolist()}")
  if int(np.prod(grid, axis=1).sum()) != n_patches:
    raise InputError(f"{name} {grid.tolist()} describes {int(np.prod(grid, axis=1).sum())} "
                     f"patches, but the pixels hold {n_patches}")


def token_types(cfg: Qwen2VLConfig, ids, mask, given) -> np.ndarray:
  """i32[B, T]: 0 text, 1 image, 2 video placeholder (transformers' mm_token_type_ids); a
  given `mm_token_type_ids` must agree on the valid slots."""
  types = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
  if given is not None:
    given = np.asarray(given)
    if given.shape != ids.shape or (np.where(mask, given != types, False)).any():
      raise InputError("mm_token_type_ids does not match the image/video placeholders of "
                       "input_ids")
  return (types * mask).astype(np.int32)


def _check_counts(cfg: Qwen2VLConfig, types, grids: dict) -> None:
  """Each kind's placeholder count must equal its grids' merged-token count."""
  for kind, (what, _, grid_name) in KINDS.items():
    want = int(np.prod(grids[kind], axis=1).sum()) // cfg.vision.merge_unit
    have = int((types == kind).sum())
    if have != want:
      raise InputError(f"input_ids hold {have} {what} tokens, but {grid_name} gives {want} "
                       f"{what} features")


def vision_positions(start: int, grid, merge: int, interval) -> np.ndarray:
  """i64[n, 3]: (t, h, w) positions of one image / video's merged tokens
  (transformers' `get_vision_position_ids`; `interval` spaces the frames)."""
  t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
  if isinstance(interval, np.floating):   # float32 as torch: arange(t) * interval, truncated
    tt = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
  else:
    tt = np.arange(t, dtype=np.int64) * interval
  pos = np.stack(np.meshgrid(tt, np.arange(h) + start, np.arange(w) + start, indexing="ij"))
  pos = pos.reshape(3, -1).T
  pos[:, 0] += start
  return pos


def _intervals(cfg: Qwen2VLConfig, seconds):
  """The iterator of video frame spacings: 1 for Qwen2-VL; tokens_per_second times each
  video's second_per_grid_ts (float32, as torch computes it) for Qwen2.5-VL."""
  tps = cfg.vision.tokens_per_second
  if cfg.model_type == "qwen2_vl":
    return itertools.repeat(1)
  if seconds is None:
    return itertools.repeat(tps)
  return iter(np.float32(tps) * np.asarray(seconds, np.float32).reshape(-1))


def _example_positions(cfg: Qwen2VLConfig, types_N, grids: dict, intervals, b: int):
  """i64[N, 3] positions of one example's valid tokens (types_N: their token types)."""
  m, cur, chunks = cfg.vision.spatial_merge_size, 0, []
  for kind, group in itertools.groupby(types_N.tolist()):
    n = len(list(group))
    if kind == 0:
      chunks.append(np.repeat(np.arange(n)[:, None] + cur, 3, axis=1))
      cur += n
      continue
    grid = next(grids[kind])
    interval = next(intervals) if kind == 2 else 1
    pos = vision_positions(cur, grid, m, interval)
    if len(pos) != n:
      raise InputError(f"example {b}: a run of {n} {KINDS[kind][0]} tokens, but its grid "
                       f"{list(map(int, grid))} gives {len(pos)} features")
    chunks.append(pos)
    cur += max(int(grid[1]), int(grid[2])) // m
  return np.concatenate(chunks)


def rope_index(cfg: Qwen2VLConfig, types_BxT, mask_BxT, grids: dict, seconds=None):
  """(positions i32[B, T, 3], rope deltas i32[B]): transformers' `get_rope_index` on the
  host. Text advances by 1 on every axis; an image/video run gets (start + t * interval,
  start + row, start + column), and the text after it starts at start + max(h, w) / merge.
  Padding slots hold 0. delta = max position + 1 - valid length."""
  its = {kind: iter(g) for kind, g in grids.items()}
  intervals = _intervals(cfg, seconds)
  pos = np.zeros(types_BxT.shape + (3,), np.int64)
  deltas = np.zeros(types_BxT.shape[0], np.int64)
  for b in range(types_BxT.shape[0]):
    valid = mask_BxT[b].astype(bool)
    p = _example_positions(cfg, types_BxT[b][valid], its, intervals, b)
    pos[b, valid] = p
    deltas[b] = p.max() + 1 - len(p)
  return pos.astype(np.int32), deltas.astype(np.int32)


def feature_index(cfg: Qwen2VLConfig, types_BxT, grids: dict) -> np.ndarray:
  """i32[B, T]: the merged-feature row each placeholder takes (-1 for text and padding).
  Images fill rows in batch order, then videos, as the packed tower writes them."""
  out = np.full(types_BxT.shape, -1, np.int64)
  n_img = int(np.prod(grids[1], axis=1).sum()) // cfg.vision.merge_unit
  for kind, base in ((1, 0), (2, n_img)):
    sel = types_BxT == kind
    out[sel] = base + np.arange(int(sel.sum()))
  return out.astype(np.int32)


def _positions(given, types, mask, cfg, grids, seconds):
  """The M-RoPE positions i32[B, T, 3]: computed (`rope_index`), or given in transformers'
  layout [3, B, T]."""
  if given is None:
    return rope_index(cfg, types, mask, grids, seconds)[0]
  given = np.asarray(given)
  if given.ndim != 3 or given.shape[0] != 3 or given.shape[1:] != types.shape:
    raise InputError(f"position_ids must be [3, batch, length] (M-RoPE), got {list(given.shape)}")
  return np.moveaxis(given, 0, -1).astype(np.int32)


def prepare(cfg: Qwen2VLConfig, inputs: dict) -> Prepared:
  """Host-side checks and indices (see the module docstring). arrays: input_ids, attention_mask,
  position_ids i32[B, T, 3] and, with images or videos, the packed patches f32[P', F] (P' the
  bucket), feature_index i32[B, T] and the tower's `vision.layout`."""
  ids, mask, _ = inputs_lib.text_inputs(inputs["input_ids"], inputs.get("attention_mask"))
  ids_np, mask_np = np.asarray(ids), np.asarray(mask)
  inputs_lib.check_vocab(ids_np, cfg.text.vocab_size, (cfg.image_token_id, cfg.video_token_id))
  if cfg.model_type == "qwen2_vl" and inputs.get("second_per_grid_ts") is not None:
    raise InputError("second_per_grid_ts is a Qwen2.5-VL input; this is a Qwen2-VL model")
  (px_i, g_i), (px_v, g_v) = (_visual_input(cfg, inputs, k) for k in KINDS)
  types = token_types(cfg, ids_np, mask_np, inputs.get("mm_token_type_ids"))
  grids = {1: g_i, 2: g_v}
  _check_counts(cfg, types, grids)
  pos = _positions(inputs.get("position_ids"), types, mask_np, cfg, grids,
                   inputs.get("second_per_grid_ts"))
  arrays = {"input_ids": ids, "attention_mask": mask, "position_ids": jnp.asarray(pos)}
  if len(g_i) + len(g_v):
    lay = vision.layout(cfg.vision, np.concatenate([g_i, g_v]))
    px = np.concatenate([px_i, px_v])
    arrays.update({k: jnp.asarray(v) for k, v in lay.items()},
                  patches=jnp.asarray(vision._pad(px, lay["vision_pos"].shape[0], 0.0)),
                  feature_index=jnp.asarray(feature_index(cfg, types, grids)))
  n_vis = (types > 0).sum(axis=1)
  return Prepared(arrays, visual_B=n_vis, text_B=mask_np.sum(axis=1) - n_vis)


def visual_grids(cfg: Qwen2VLConfig, inputs: dict) -> list[list[np.ndarray]]:
  """Per example, the i32[h / m, w / m] grids of sequence slots of its merged visual tokens
  (m the spatial merge size), in the order they appear: one per image, one per temporal patch
  of a video (grid (t, h, w): t grids). `inputs` as `prepare` takes them (checked)."""
  ids = np.asarray(inputs["input_ids"])
  m, out = cfg.vision.spatial_merge_size, []
  for kind, (_, _, grid_name) in KINDS.items():
    token = cfg.image_token_id if kind == 1 else cfg.video_token_id
    grids = np.asarray(inputs[grid_name]) if inputs.get(grid_name) is not None else np.zeros((0, 3))
    counts = [int(np.prod(g)) // cfg.vision.merge_unit for g in grids]
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids))).astype(bool)
    for (b, slots), (t, h, w) in zip(family.image_runs((ids == token) & mask, counts), grids):
      out += [(b, frame) for frame in slots.reshape(int(t), int(h) // m, int(w) // m)]
  return family.by_example(ids.shape[0], out)


# ---- the jitted part -----------------------------------------------------------------------

def input_embeddings(cfg: Qwen2VLConfig, params, arrays: dict):
  """f[B, T, D]: token embeddings with each placeholder replaced by its merged feature."""
  x = qwen2.embed(cfg.text, params["llm"], arrays["input_ids"])
  if "patches" not in arrays:
    return x
  feats = vision.tower(cfg.vision, params["vision"], arrays["patches"], arrays,
                       jnp.dtype(cfg.text.dtype)).astype(x.dtype)
  idx = arrays["feature_index"]
  return jnp.where((idx >= 0)[..., None], feats[jnp.maximum(idx, 0)], x)


def token_state(cfg: Qwen2VLConfig, params, arrays: dict) -> TokenState:
  """The TokenState entering the decoder; positions i32[B, T, 3]."""
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  b, t = ids.shape
  visual = jnp.zeros_like(mask)
  if "feature_index" in arrays:
    visual = (arrays["feature_index"] >= 0) & mask
  return TokenState(hidden=input_embeddings(cfg, params, arrays), positions=arrays["position_ids"],
                    valid=mask, visual=visual,
                    origin=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


# ---- the family interface ------------------------------------------------------------------

def decoder(cfg: Qwen2VLConfig) -> qwen2.Decoder:
  return qwen2.Decoder(cfg.text)


def decoder_params(params) -> dict:
  return params["llm"]


def init_params(cfg: Qwen2VLConfig, key) -> dict:
  """Fresh params {"vision", "llm"} (usable under `jax.eval_shape`)."""
  k_v, k_t = jax.random.split(key)
  return {"vision": vision.init_params(cfg.vision, k_v), "llm": qwen2.init_params(cfg.text, k_t)}


def rules(cfg: Qwen2VLConfig) -> list:
  """The converter's name table (the layout transformers 5 `save_pretrained` writes, which is
  the hub's)."""
  from jaxmm.converters.qwen2_vl import qwen2_vl_rules  # converters import the models
  return qwen2_vl_rules(cfg, "hub")


def forward(cfg: Qwen2VLConfig, params, **inputs):
  """Logits of Qwen2-VL / Qwen2.5-VL; inputs as the Qwen processor names them (see the module
  docstring). See `models.core.forward` for schedule, seed, example_ids and capture."""
  return core.forward(NAME, cfg, params, **inputs)
