"""The Qwen2-VL and Qwen2.5-VL vision towers over packed patches, and their host-side layouts.

All images and videos of a batch are packed into one sequence of P patches (images first, then
videos, each in the processor's order: frame-major, then 2x2 merge blocks in raster order, then
the 4 patches of a block), as transformers does. Under jit shapes are static, so P is padded to
a bucket (a power of two, `bucket`): every index-like array is computed on the host in NumPy
(`layout`) and two image sizes in the same bucket share one compiled tower.

Attention is exact through segment ids: a patch attends to the patches of its own frame of its
own image (transformers' `cu_seqlens`) and, in Qwen2.5-VL's window blocks, of its own window
(`cu_window_seqlens`). Qwen2.5-VL runs its blocks on the merge units permuted into window order
(`window_index`) and restores the order after the merger (`window_reverse`), as transformers
does. Padding patches form their own segment (id -1): they attend only to each other and are
never read. The masks are dense [P, P]: memory grows as P^2 per head.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.config import Qwen2VLVisionConfig
from jaxmm.layers import rope as rope_lib
from jaxmm.layers.attention import attend
from jaxmm.layers.mlp import Mlp, SwiGLU
from jaxmm.layers.norms import RMSNorm

MIN_BUCKET = 16   # the smallest padded patch count (a multiple of every merge unit used)


def bucket(n: int) -> int:
  """The padded patch count for n patches: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << max(int(n) - 1, 0).bit_length())


# ---- host-side layouts (NumPy) -------------------------------------------------------------

def rotary_positions(grids_Nx3: np.ndarray, merge: int) -> np.ndarray:
  """i32[P, 2]: the (row, column) of every patch in its frame, in the packed order (merge
  blocks in raster order, the merge x merge patches of a block in raster order), every frame
  of an entry repeating its image's positions."""
  out = []
  for t, h, w in np.asarray(grids_Nx3, np.int64):
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hw = np.stack([hh.reshape(shape).transpose(0, 2, 1, 3).ravel(),
                   ww.reshape(shape).transpose(0, 2, 1, 3).ravel()], axis=-1)
    out.append(np.tile(hw, (t, 1)))
  return np.concatenate(out).astype(np.int32)


def frame_segments(grids_Nx3: np.ndarray) -> np.ndarray:
  """i32[P]: one segment id per frame of each entry (full attention stays inside a frame)."""
  sizes = [h * w for t, h, w in np.asarray(grids_Nx3, np.int64) for _ in range(t)]
  return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)


def window_index(cfg: Qwen2VLVisionConfig, grids_Nx3: np.ndarray):
  """(i32[U] merge units in window order, i32[U] the window id of each of them), U the merge
  units of all entries: transformers' `get_vision_window_index` (windows of
  window_size // merge // patch_size units per side, per frame, raster order; empty windows
  dropped)."""
  m = cfg.spatial_merge_size
  side = cfg.window_size // m // cfg.patch_size
  order, ids, offset, n_windows = [], [], 0, 0
  for t, h, w in np.asarray(grids_Nx3, np.int64):
    lh, lw = h // m, w // m
    ph, pw = side - lh % side, side - lw % side
    grid = np.full((t, lh + ph, lw + pw), -1, np.int64)
    grid[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    nh, nw = (lh + ph) // side, (lw + pw) // side
    win = grid.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
    counts = (win >= 0).sum(axis=1)
    order.append(win[win >= 0] + offset)
    ids.append(np.repeat(np.arange(len(counts)) + n_windows, counts))
    offset, n_windows = offset + t * lh * lw, n_windows + len(counts)
  return np.concatenate(order).astype(np.int32), np.concatenate(ids).astype(np.int32)


def _pad(a: np.ndarray, n: int, fill) -> np.ndarray:
  pad = np.full((n - a.shape[0],) + a.shape[1:], fill, a.dtype)
  return np.concatenate([a, pad])


def layout(cfg: Qwen2VLVisionConfig, grids_Nx3: np.ndarray) -> dict:
  """The tower's index arrays for packed patches of `grids_Nx3` (t, h, w per entry), padded to
  `bucket(P)` patches: "vision_pos" i32[P', 2] rotary (row, column); "vision_seg" i32[P']
  frame segment ids (-1 on padding); for Qwen2.5-VL also "window_index" i32[U'] (merge units
  in window order; padding units last, in place), "window_reverse" i32[U'] (its inverse) and
  "window_seg" i32[P'] (window ids of the permuted patches, -1 on padding)."""
  grids = np.asarray(grids_Nx3, np.int64)
  n = int(np.prod(grids, axis=1).sum())
  p = bucket(n)
  out = {"vision_pos": _pad(rotary_positions(grids, cfg.spatial_merge_size), p, 0),
         "vision_seg": _pad(frame_segments(grids), p, -1)}
  if cfg.variant == "qwen2_5_vl":
    unit = cfg.merge_unit
    order, ids = window_index(cfg, grids)
    order = np.concatenate([order, np.arange(n // unit, p // unit, dtype=np.int32)])
    out.update(window_index=order, window_reverse=np.argsort(order).astype(np.int32),
               window_seg=np.repeat(_pad(ids, p // unit, -1), unit))
  return out


# ---- the tower (jittable) ------------------------------------------------------------------

def rotary_tables(cfg: Qwen2VLVisionConfig, pos_Px2):
  """2-D rotary (sin, cos) f32[1, P, head_dim]: the first head_dim/4 frequencies rotate by
  the row, the next head_dim/4 by the column, the second half repeats the first."""
  half = cfg.head_dim // 2
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
  f = pos_Px2[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32)   # P, 2, d/4
  f = f.reshape(f.shape[0], -1)
  emb = jnp.concatenate([f, f], axis=-1)[None]
  return jnp.sin(emb), jnp.cos(emb)


class Block(nn.Module):
  """A pre-norm ViT block with fused qkv, 2-D rotary and a segment mask. Qwen2-VL: LayerNorm
  and an fc1/fc2 MLP (`hidden_act`); Qwen2.5-VL: RMSNorm and a biased SwiGLU."""
  cfg: Qwen2VLVisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_1xPxE, tables, mask_1xPxP):
    cfg, dt = self.cfg, self.dtype
    norm = ((lambda name: nn.LayerNorm(1e-6, dtype=dt, name=name)) if cfg.variant == "qwen2_vl"
            else (lambda name: RMSNorm(1e-6, name=name)))
    b, p, e = x_1xPxE.shape
    qkv = nn.Dense(3 * e, dtype=dt, name="qkv")(norm("norm1")(x_1xPxE))
    q, k, v = (qkv.reshape(b, p, 3, cfg.num_heads, -1)[:, :, i] for i in range(3))
    q, k = rope_lib.apply_rope(q, *tables), rope_lib.apply_rope(k, *tables)
    a = attend(q, k, v, mask_1xPxP, cfg.head_dim ** -0.5)
    x = x_1xPxE + nn.Dense(e, dtype=dt, name="proj")(a)
    if cfg.variant == "qwen2_vl":
      mlp = Mlp(cfg.intermediate_size, e, cfg.hidden_act, True, dt, name="mlp")
    else:
      mlp = SwiGLU(cfg.intermediate_size, True, dt, name="mlp")
    return x + mlp(norm("norm2")(x))


class Merger(nn.Module):
  """The patch merger: norm, each merge unit's patches concatenated, a GELU MLP to the decoder
  width. f[P, E] -> f[P / unit, out_hidden_size]."""
  cfg: Qwen2VLVisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_PxE):
    cfg = self.cfg
    norm = (nn.LayerNorm(1e-6, dtype=self.dtype, name="ln_q") if cfg.variant == "qwen2_vl"
            else RMSNorm(1e-6, name="ln_q"))
    h = norm(x_PxE).reshape(-1, cfg.merge_unit * x_PxE.shape[-1])
    return Mlp(h.shape[-1], cfg.out_hidden_size, "gelu", True, self.dtype, name="mlp")(h)


def patch_embed(cfg: Qwen2VLVisionConfig, kernel, patches_PxF):
  """The Conv3d patch embedding as one matmul: kernel f[T_p, p, p, C, E] (Flax's 3-D conv
  layout) over patches flattened as (C, T_p, p, p)."""
  w = kernel.transpose(3, 0, 1, 2, 4).reshape(cfg.patch_dim, cfg.hidden_size)
  return jnp.dot(patches_PxF.astype(w.dtype), w)


def _units(a, unit: int, order):
  """Reorders the merge units (groups of `unit` consecutive rows) of a by `order`."""
  return a.reshape((-1, unit) + a.shape[1:])[order].reshape(a.shape)


def _masks(cfg: Qwen2VLVisionConfig, arrays: dict):
  """(full, window) bool[1, P, P] masks in the blocks' token order (window order for
  Qwen2.5-VL, where `window` is the window mask; for Qwen2-VL both are the frame mask)."""
  seg = arrays["vision_seg"]
  if cfg.variant == "qwen2_5_vl":
    seg = _units(seg, cfg.merge_unit, arrays["window_index"])
    win = arrays["window_seg"]
    return (seg[:, None] == seg[None, :])[None], (win[:, None] == win[None, :])[None]
  full = (seg[:, None] == seg[None, :])[None]
  return full, full


def tower(cfg: Qwen2VLVisionConfig, params, patches_PxF, arrays: dict, dtype=jnp.float32):
  """Merged visual features f[P / unit, out_hidden_size] of packed patches f[P, F], in the
  packed order; `arrays`: the `layout` of their grids."""
  unit = cfg.merge_unit
  x = patch_embed(cfg, params["patch_embed"]["kernel"], patches_PxF).astype(dtype)
  pos = arrays["vision_pos"]
  if cfg.variant == "qwen2_5_vl":
    x = _units(x, unit, arrays["window_index"])
    pos = _units(pos, unit, arrays["window_index"])
  tables = rotary_tables(cfg, pos)
  full, win = _masks(cfg, arrays)
  is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
  block = Block(cfg, dtype)

  def body(h, xs):
    p, use_full = xs
    return block.apply({"params": p}, h, tables, jnp.where(use_full, full, win)), None

  h, _ = jax.lax.scan(body, x[None], (params["blocks"], is_full))
  merged = Merger(cfg, dtype).apply({"params": params["merger"]}, h[0])
  if cfg.variant == "qwen2_5_vl":
    merged = merged[arrays["window_reverse"]]
  return merged


def init_params(cfg: Qwen2VLVisionConfig, key) -> dict:
  """Fresh tower params (Flax default initialisers; usable under `jax.eval_shape`)."""
  k_patch, k_blocks, k_merge = jax.random.split(key, 3)
  e, p, u = cfg.hidden_size, 2 * cfg.merge_unit, cfg.merge_unit
  x = jnp.zeros((1, p, e))
  tables = rotary_tables(cfg, jnp.zeros((p, 2), jnp.int32))
  mask = jnp.ones((1, p, p), bool)
  blocks = jax.vmap(lambda k: Block(cfg).init(k, x, tables, mask)["params"])(
      jax.random.split(k_blocks, cfg.depth))
  shape = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, cfg.in_channels, e)
  return {"patch_embed": {"kernel": jax.random.normal(k_patch, shape) * cfg.patch_dim ** -0.5},
          "blocks": blocks,
          "merger": Merger(cfg).init(k_merge, jnp.zeros((u, e)))["params"]}
