"""Evaluation of a CADIT/baseline params tree: target accuracy, label-flip rate, translation grid."""

from pathlib import Path

import numpy as np
from PIL import Image

from jaxmm import checkpoint
from jaxmm.cadit import steps
from jaxmm.cadit.config import Config


def _batches(x, batch):
  for i in range(0, len(x), batch):
    yield x[i:i + batch]


def predict(cfg: Config, params, x_NxHxWxC, batch: int = 500) -> np.ndarray:
  """Deployed predictions (argmax C_t, or the §4.4 ensemble) -> i32[N]."""
  return np.concatenate([np.asarray(steps.predict_logits(cfg, params, xb)).argmax(-1)
                         for xb in _batches(x_NxHxWxC, batch)])


def accuracy(cfg: Config, params, x, y, batch: int = 500) -> float:
  return float((predict(cfg, params, x, batch) == y).mean())


def translate(cfg: Config, params, x, batch: int = 500) -> np.ndarray:
  return np.concatenate([np.asarray(steps.translate(cfg, params, xb)) for xb in _batches(x, batch)])


def label_flip_rate(cfg: Config, params, xs, ys, batch: int = 500) -> float:
  """Share of translated source images G_st(xs) that C_t assigns to a class other than ys."""
  cfg_plain = cfg if not cfg.infer_ensemble else Config.from_dict(
      {**cfg.to_dict(), "infer_ensemble": False})
  fake = translate(cfg, params, xs, batch)
  return float((predict(cfg_plain, params, fake, batch) != ys).mean())


def grid_indices(y_N: np.ndarray, per_class: int = 4, num_classes: int = 10) -> np.ndarray:
  """The first `per_class` examples of each class, class-major: a fixed set to watch over time."""
  return np.concatenate([np.flatnonzero(y_N == c)[:per_class] for c in range(num_classes)])


def grid_image(src_NxHxWx1, fake_NxHxWx1, per_row: int = 4, scale: int = 3) -> Image.Image:
  """Rows of (source | translation) pairs, grey, pixels upscaled by `scale`; 2-pixel gaps."""
  n, h, w, _ = src_NxHxWx1.shape
  rows = -(-n // per_row)
  canvas = np.full((rows * (h + 2), per_row * (2 * w + 4)), 128, np.uint8)
  to_u8 = lambda x: np.clip((x[..., 0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
  for i in range(n):
    r, c = divmod(i, per_row)
    y0, x0 = r * (h + 2), c * (2 * w + 4)
    canvas[y0:y0 + h, x0:x0 + w] = to_u8(src_NxHxWx1[i])
    canvas[y0:y0 + h, x0 + w:x0 + 2 * w] = to_u8(fake_NxHxWx1[i])
  img = Image.fromarray(canvas, "L")
  return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def write_grid(path, cfg: Config, params, src_NxHxWx1) -> Path:
  """Translates `src` with G_st and writes the pair grid atomically (temp file, then rename)."""
  img = grid_image(np.asarray(src_NxHxWx1), translate(cfg, params, src_NxHxWx1))
  return checkpoint.atomic_file(path, lambda tmp: img.save(tmp, format="PNG"))
