"""Evaluation of a CADIT/baseline params tree: target accuracy, label-flip rate, translation grid."""

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from jaxmm import checkpoint
from jaxmm.cadit import steps
from jaxmm.cadit.config import PRESETS, Config


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


def preset_and_changes(cfg: dict) -> tuple[str, str]:
  """The preset closest to `cfg` (same method) and the fields where cfg differs from it."""
  diffs = {}
  for name in sorted(PRESETS):
    base = dataclasses.replace(PRESETS[name](), method=cfg["method"]).to_dict()
    diffs[name] = [f"{k}={cfg[k]}" for k in sorted(cfg) if cfg[k] != base[k]]
  name = min(diffs, key=lambda n: len(diffs[n]))
  return name, ",".join(diffs[name])


def summarize(rows: list[dict]) -> list[dict]:
  """Per-run results grouped by (task, config): mean and std over seeds.

  rows: dicts with "task", "seed", "config" (Config.to_dict()), "target_acc", and optionally
  "label_flip_rate", "iterations", "wall_s". Each group names its closest preset and the
  config fields that differ from it ("changes", e.g. an ablation's use_sp=False).
  std is the sample standard deviation over seeds (ddof=1; 0 for a single seed).
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["task"], json.dumps(r["config"], sort_keys=True)), []).append(r)
  out = []
  for (task, cfg), rs in groups.items():
    preset, changes = preset_and_changes(json.loads(cfg))
    acc = np.array([r["target_acc"] for r in rs], np.float64)
    g = {"task": task, "method": rs[0]["config"]["method"], "preset": preset, "changes": changes,
         "seeds": sorted(r["seed"] for r in rs), "target_acc_mean": float(acc.mean()),
         "target_acc_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0}
    for k in ("label_flip_rate", "iterations", "wall_s"):
      if all(k in r for r in rs):
        g[f"{k}_mean"] = float(np.mean([r[k] for r in rs]))
    out.append(g)
  return out
