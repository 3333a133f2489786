"""LLaVA-NeXT (LLaVA-1.6): LLaVA-1.5's CLIP tower, projector and LLaMA decoder, with anyres images.

An image of size (H0, W0) reaches the model as tiles of the tower's S x S: the whole image
resized (the base), then the crops of its best resolution among `image_grid_pinpoints`
(`best_resolution`), a rows x cols grid. Its features are, in the order of transformers'
`LlavaNextModel.pack_image_features`: the base's h x w patch features (h = S / patch), then the
tiles' features folded into one (rows h) x (cols w) grid, cut back to the image's aspect ratio
(`unpadded_grid`, the spatial unpad), row by row, each row followed by the learned
`image_newline` embedding. An image's feature count thus depends on its size (`num_features`,
as the processor's `_get_number_of_features`).

Static shapes: the host (`prepare`, NumPy) computes from `image_sizes` and the config where the
embedding of every slot of `input_ids` comes from: `feature_index` i32[B, T] holds a row of the
flattened tile features f[I * P * h * w, D] of the padded `pixel_values` [I, P, C, S, S],
`NEWLINE`, or `TEXT`. Under jit the tower runs on all I x P tiles (zero-padded tiles included:
each tile is encoded on its own, so padding changes no real feature) and one gather merges the
features into the token embeddings. A compile depends only on (B, T, I, P), never on the image
sizes, so images of several sizes mix in one batch, each example with its own visual count.

Pruning sees the whole anyres block (base, tiles and newlines) as the example's visual tokens,
as the reference code does (pruning.md §5, §10.10); `prune_newlines=False` keeps the newline
slots out of the candidates (they then count as text and are never dropped).
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm.config import LlavaNextConfig
from jaxmm.errors import InputError
from jaxmm.models import core, llama, llava
from jaxmm.models import family
from jaxmm.models.family import Prepared
from jaxmm.pruning.state import TokenState

Config = LlavaNextConfig
NAME = "llava_next"
INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes",
                    "prune_newlines"})
NEWLINE, TEXT = -1, -2   # feature_index values that are not feature rows


# ---- anyres geometry (host, NumPy; exactly transformers' integer and float arithmetic) -----------

def best_resolution(size_hw, pinpoints) -> tuple[int, int]:
  """The (height, width) pinpoint transformers' `select_best_resolution` picks for an image of
  size (height, width): the most effective pixels, then the least waste (first on ties)."""
  h0, w0 = int(size_hw[0]), int(size_hw[1])
  best, best_eff, best_waste = None, 0, float("inf")
  for h, w in pinpoints:
    scale = min(w / w0, h / h0)
    eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
    waste = w * h - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (h, w), eff, waste
  return best


def tile_grid(cfg: LlavaNextConfig, size_hw) -> tuple[int, int]:
  """(rows, cols) of S x S tiles of the image's best resolution."""
  h, w = best_resolution(size_hw, cfg.image_grid_pinpoints)
  s = cfg.vision.image_size
  return h // s, w // s


def num_tiles(cfg: LlavaNextConfig, size_hw) -> int:
  """The tiles the processor emits for the image: the base and rows x cols crops."""
  rows, cols = tile_grid(cfg, size_hw)
  return 1 + rows * cols


def unpadded_grid(cfg: LlavaNextConfig, size_hw) -> tuple[int, int, int, int]:
  """(top, n_rows, left, n_cols): the window of the (rows h) x (cols w) tile-feature grid that
  the spatial unpad keeps (transformers' `unpad_image`): the padding the resize to the best
  resolution added, on the long side of the aspect-ratio mismatch, is cut off symmetrically."""
  h0, w0 = int(size_hw[0]), int(size_hw[1])
  rows, cols = tile_grid(cfg, size_hw)
  side = cfg.vision.image_size // cfg.vision.patch_size
  ch, cw = rows * side, cols * side
  if w0 / h0 > cw / ch:
    pad = (ch - int(round(h0 * (cw / w0), 7))) // 2
    return pad, ch - 2 * pad, 0, cw
  pad = (cw - int(round(w0 * (ch / h0), 7))) // 2
  return 0, ch, pad, cw - 2 * pad


def feature_sources(cfg: LlavaNextConfig, size_hw) -> np.ndarray:
  """i32[n]: for each of the image's n features in order, its row in the image's flattened tile
  features f[tiles * h * w] (tile 0 is the base), or NEWLINE."""
  side = cfg.vision.image_size // cfg.vision.patch_size
  _, cols = tile_grid(cfg, size_hw)
  top, n_rows, left, n_cols = unpadded_grid(cfg, size_hw)
  r = np.arange(top, top + n_rows)[:, None]
  c = np.arange(left, left + n_cols)[None, :]
  tile = 1 + (r // side) * cols + c // side
  grid = tile * side * side + (r % side) * side + c % side
  grid = np.concatenate([grid, np.full((n_rows, 1), NEWLINE)], axis=1)
  return np.concatenate([np.arange(side * side), grid.reshape(-1)]).astype(np.int32)


def num_features(cfg: LlavaNextConfig, size_hw) -> int:
  """The image's feature (= placeholder token) count: base h w + unpadded rows x (cols + 1)."""
  side = cfg.vision.image_size // cfg.vision.patch_size
  _, n_rows, _, n_cols = unpadded_grid(cfg, size_hw)
  return side * side + n_rows * (n_cols + 1)


# ---- host-side checks and the gather plan ---------------------------------------------------

def _check_sizes(cfg: LlavaNextConfig, px, image_sizes) -> np.ndarray:
  """i64[I, 2] image sizes, checked against pixel_values [I, P, C, S, S]."""
  if image_sizes is None:
    raise InputError("LLaVA-NeXT needs image_sizes [images, 2] (each image's height, width) "
                     "with pixel_values")
  sizes = np.asarray(image_sizes)
  if sizes.shape != (px.shape[0], 2) or not np.issubdtype(sizes.dtype, np.integer):
    raise InputError(f"image_sizes must be integers [images, 2] = [{px.shape[0]}, 2] (one "
                     f"height, width per image of pixel_values), got {sizes.dtype}"
                     f"{list(sizes.shape)}")
  if (sizes <= 0).any():
    raise InputError(f"image_sizes must be positive, got {sizes.tolist()}")
  need = [num_tiles(cfg, s) for s in sizes]
  if max(need, default=0) > px.shape[1]:
    i = int(np.argmax(need))
    raise InputError(f"image {i} of size {sizes[i].tolist()} takes {need[i]} tiles (base + "
                     f"{tile_grid(cfg, sizes[i])} crops), but pixel_values holds {px.shape[1]} "
                     "per image")
  return sizes


def check_images(cfg: LlavaNextConfig, input_ids, pixel_values, image_sizes):
  """(pixel_values f[I, P, C, S, S] or None, image sizes i64[I, 2] or None) after checking
  shapes and that the placeholders equal the images' anyres feature counts."""
  n_tok = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
  if pixel_values is None:
    if n_tok or image_sizes is not None:
      raise InputError(f"input_ids hold {n_tok} image tokens and image_sizes is "
                       f"{'given' if image_sizes is not None else 'None'}, but no pixel_values")
    return None, None
  px = jnp.asarray(pixel_values)
  v = cfg.vision
  want = (v.num_channels, v.image_size, v.image_size)
  if px.ndim != 5 or tuple(px.shape[2:]) != want:
    raise InputError(f"pixel_values must be 5-D [images, tiles, {want[0]}, {want[1]}, {want[2]}] "
                     f"(LLaVA-NeXT anyres, as its processor pads them), got {list(px.shape)}")
  inputs_lib.check_finite(px, "pixel_values")
  sizes = _check_sizes(cfg, px, image_sizes)
  counts = [num_features(cfg, s) for s in sizes]
  if n_tok != sum(counts):
    raise InputError(f"input_ids hold {n_tok} image tokens, but the anyres features of "
                     f"{len(counts)} image(s) of sizes {sizes.tolist()} number {sum(counts)} "
                     f"({counts} each)")
  return px, sizes


def feature_index(cfg: LlavaNextConfig, input_ids, sizes, tiles: int) -> np.ndarray:
  """i32[B, T]: each slot's row in the flattened tile features f[I * tiles * h * w, D], NEWLINE,
  or TEXT. Placeholders take the images' features in order over the flattened batch
  (transformers' `masked_scatter`)."""
  ids = np.asarray(input_ids)
  index = np.full(ids.shape, TEXT, np.int32)
  if sizes is None or not len(sizes):
    return index
  per_image = tiles * (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  src = []
  for i, size in enumerate(sizes):
    rows = feature_sources(cfg, size)
    src.append(np.where(rows >= 0, rows + i * per_image, NEWLINE))
  index[ids == cfg.image_token_id] = np.concatenate(src)
  return index


def prepare(cfg: LlavaNextConfig, inputs: dict) -> Prepared:
  """Host-side checks; each example holds any number of images of any sizes, so its visual
  count is its own. `prune_newlines` (default True): whether newline slots are visual tokens
  (prunable) or text."""
  ids, mask, pos = inputs_lib.text_inputs(inputs["input_ids"], inputs.get("attention_mask"),
                                          inputs.get("position_ids"))
  inputs_lib.check_vocab(ids, cfg.text.vocab_size, allowed=(cfg.image_token_id,))
  prune_newlines = inputs.get("prune_newlines", True)
  if not isinstance(prune_newlines, (bool, np.bool_)):
    raise InputError(f"prune_newlines must be True or False, got {prune_newlines!r}")
  px, sizes = check_images(cfg, ids, inputs.get("pixel_values"), inputs.get("image_sizes"))
  index = feature_index(cfg, ids, sizes, 0 if px is None else px.shape[1])
  valid = np.asarray(mask)
  visual = ((index >= 0) | (bool(prune_newlines) & (index == NEWLINE))) & valid
  n_vis = visual.sum(axis=1)
  arrays = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "pixel_values": px,
            "feature_index": index, "visual": visual}
  return Prepared(arrays, visual_B=n_vis, text_B=valid.sum(axis=1) - n_vis)


def image_grids(cfg: LlavaNextConfig, size_hw, slots) -> list[np.ndarray]:
  """The 2-D grids of one image's feature slots (`slots`: its placeholders in order): the base's
  side x side features, then the unpadded tile grid (`unpadded_grid`) without the newline
  column."""
  side = cfg.vision.image_size // cfg.vision.patch_size
  _, n_rows, _, n_cols = unpadded_grid(cfg, size_hw)
  tiles = np.asarray(slots[side * side:]).reshape(n_rows, n_cols + 1)[:, :n_cols]
  return [np.asarray(slots[:side * side]).reshape(side, side), tiles]


def visual_grids(cfg: LlavaNextConfig, inputs: dict) -> list[list[np.ndarray]]:
  """Per example, two i32 grids of sequence slots per image, in order: the base (side x side)
  and the unpadded tile grid (rows x cols of `unpadded_grid`); the newline slots belong to no
  grid. `inputs` as `prepare` takes them (checked)."""
  ids = np.asarray(inputs["input_ids"])
  sizes = np.asarray(inputs["image_sizes"]) if inputs.get("image_sizes") is not None else ()
  runs = family.image_runs(ids == cfg.image_token_id, [num_features(cfg, s) for s in sizes])
  return family.by_example(ids.shape[0], [(b, g) for (b, slots), size in zip(runs, sizes)
                                          for g in image_grids(cfg, size, slots)])


# ---- the jitted side --------------------------------------------------------------------------

def tile_features(cfg: LlavaNextConfig, params, pixels_IxPxCxSxS):
  """f[I * P * h * w, D]: the projected patch features of every tile, flattened (image, tile,
  patch) row-major; the base is tile 0 of each image."""
  tiles = pixels_IxPxCxSxS.reshape(-1, *pixels_IxPxCxSxS.shape[2:])
  feats = llava.image_features(cfg, params, tiles)
  return feats.reshape(-1, feats.shape[-1])


def input_embeddings(cfg: LlavaNextConfig, params, input_ids_BxT, index_BxT, pixel_values):
  """f[B, T, D]: token embeddings, with each image slot replaced by its tile feature or the
  newline embedding per `index_BxT` (`feature_index`); text-only when pixel_values is None."""
  x = llama.embed(cfg.text, params["llm"], input_ids_BxT)
  if pixel_values is None:
    return x
  feats = tile_features(cfg, params, pixel_values)
  table = jnp.concatenate([feats, params["image_newline"][None].astype(feats.dtype)])
  row = jnp.where(index_BxT == NEWLINE, feats.shape[0], jnp.maximum(index_BxT, 0))
  return jnp.where((index_BxT != TEXT)[..., None], table[row].astype(x.dtype), x)


def token_state(cfg: LlavaNextConfig, params, arrays: dict) -> TokenState:
  """The TokenState entering the decoder: merged embeddings, positions, masks, origins."""
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  b, t = ids.shape
  hidden = input_embeddings(cfg, params, ids, arrays["feature_index"], arrays.get("pixel_values"))
  return TokenState(hidden=hidden, positions=arrays["position_ids"], valid=mask,
                    visual=arrays["visual"] & mask,
                    origin=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


# ---- the `llava_next` family (models.family) ----------------------------------------------------

def decoder(cfg: LlavaNextConfig) -> llama.Decoder:
  return llama.Decoder(cfg.text)


def decoder_params(params) -> dict:
  return params["llm"]


def init_params(cfg: LlavaNextConfig, key, pos_init: str = "random", llm=None) -> dict:
  """Fresh params (usable under `jax.eval_shape`): LLaVA's tree (`llava.init_params`) and the
  newline embedding, N(0, 1/D) as transformers initialises it."""
  k_llava, k_newline = jax.random.split(key)
  d = cfg.text.hidden_size
  return {**llava.init_params(cfg, k_llava, pos_init, llm),
          "image_newline": jax.random.normal(k_newline, (d,)) * d ** -0.5}


def rules(cfg: LlavaNextConfig) -> list:
  """The converter's name table (the transformers-5 file layout)."""
  from jaxmm.converters.llava_next import rules as next_rules  # converters import the models
  return next_rules(cfg, "hf")


def forward(cfg: LlavaNextConfig, params, **inputs):
  """input_ids i32[B, T] with each image's `num_features` placeholders (any number of images
  per example); pixel_values f32[I, P, C, S, S] (each image's base and crops, zero-padded to P
  tiles, as the processor emits them); image_sizes i[I, 2] (height, width); attention_mask
  {0,1}[B, T]; prune_newlines (default True). See `models.core.forward` for schedule, seed,
  example_ids and capture."""
  return core.forward(NAME, cfg, params, **inputs)
