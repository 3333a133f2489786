"""Digits-VQA: visual question answering over grids of real handwritten digits.

The images are scikit-learn's bundled UCI digits (`load_digits`, 1797 real 8x8 scans), placed in
a `grid` x `grid` layout of upscaled cells. Three question categories:

  cell      "What digit is in row 2 and column 3 of the grid?"  -> "7"   (a localized lookup)
  count     "How many times does 7 appear in the grid?"         -> "2"   (global)
  presence  "Is there a 5 in the grid?"                         -> "yes" / "no" (POPE style,
            balanced: every image gets one question of each answer over the split)

Train and test grids draw from disjoint digit scans. Everything is a pure function of the seed.
`write_split` writes PNGs, a LLaVA-eval question file (`question_id`, `image`, `text`,
`category`) and a separate answer key; `training_set` gives the same data in memory.
Questions put punctuation on words that never carry information ("grid?"), so a whitespace
word-level tokenizer sees every digit and index as a plain token.
"""
import dataclasses
import functools
from pathlib import Path

import numpy as np

from jaxmm.data import vqa

CATEGORIES = ("cell", "count", "presence")
_CELL_Q = "What digit is in row {r} and column {c} of the grid?"
_COUNT_Q = "How many times does {d} appear in the grid?"
_PRESENCE_Q = "Is there a {d} in the grid?"


@dataclasses.dataclass(frozen=True)
class DigitsVQAConfig:
  """grid x grid cells of `cell_px` pixels.

  tiles = 1: the 8x8 scan, upscaled by nearest neighbour, fills its cell. tiles = t > 1: a cell
  is a t x t block of tiles of cell_px / t pixels and the scan fills one tile drawn at random;
  the rest of the cell is background, as objects in photographs leave most patches empty.
  """
  grid: int = 3
  cell_px: int = 16
  tiles: int = 1
  test_fraction: float = 0.2   # of the 1797 scans, held out for test grids
  split_seed: int = 0          # which scans are held out

  def __post_init__(self):
    # Scans are upscaled by whole pixels into a cell (tiles = 1) or into one tile.
    if self.grid < 1 or self.tiles < 1 or self.cell_px % (8 * self.tiles):
      raise ValueError(f"digits-VQA needs grid, tiles >= 1 and cell_px a multiple of 8 * tiles, "
                       f"got grid={self.grid}, cell_px={self.cell_px}, tiles={self.tiles}")

  @property
  def image_size(self) -> int:
    return self.grid * self.cell_px


def words(cfg: DigitsVQAConfig = DigitsVQAConfig()) -> tuple[str, ...]:
  """Every whitespace-separated word a question or answer can hold (the tokenizer vocabulary)."""
  texts = [_CELL_Q.format(r=1, c=1), _COUNT_Q.format(d=0), _PRESENCE_Q.format(d=0)]
  numbers = [str(i) for i in range(max(10, cfg.grid ** 2 + 1))]
  out = dict.fromkeys(numbers + ["yes", "no"] + " ".join(texts).split())
  return tuple(out)


@functools.lru_cache(maxsize=1)
def _scans():
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int64)


def scan_split(cfg: DigitsVQAConfig, split: str) -> np.ndarray:
  """Indices of the digit scans a split may use; train and test are disjoint."""
  _, labels = _scans()
  order = np.random.default_rng(cfg.split_seed).permutation(len(labels))
  n_test = int(round(cfg.test_fraction * len(labels)))
  if split not in ("train", "test"):
    raise ValueError(f"split must be train or test, got {split!r}")
  return np.sort(order[:n_test] if split == "test" else order[n_test:])


def render(cfg: DigitsVQAConfig, scan_ids_GxG: np.ndarray, tile_GxG=None) -> np.ndarray:
  """uint8[H, W] grayscale grid image (white ink on black, as in the UCI scans).

  tile_GxG: the tile (row-major in its cell) that holds each cell's scan; None = tile 0, the
  only one when cfg.tiles = 1. Scans are upscaled by nearest neighbour to fill their tile.
  """
  images, _ = _scans()
  t, tile = cfg.tiles, cfg.cell_px // cfg.tiles
  s = tile // 8                                  # a whole number (`DigitsVQAConfig` checks it)
  tile_GxG = np.zeros_like(scan_ids_GxG) if tile_GxG is None else tile_GxG
  out = np.zeros((cfg.image_size, cfg.image_size), np.float32)
  for (r, c), scan in np.ndenumerate(scan_ids_GxG):
    y = r * cfg.cell_px + (tile_GxG[r, c] // t) * tile
    x = c * cfg.cell_px + (tile_GxG[r, c] % t) * tile
    out[y:y + tile, x:x + tile] = (images[scan] * (255.0 / 16.0)).repeat(s, 0).repeat(s, 1)
  return out.round().astype(np.uint8)


def _pools(cfg: DigitsVQAConfig, split: str) -> dict:
  """class -> scan ids of that class available to the split."""
  _, labels = _scans()
  pool = scan_split(cfg, split)
  return {c: pool[labels[pool] == c] for c in range(10)}


def sample_grid(cfg: DigitsVQAConfig, pools: dict, rng) -> np.ndarray:
  """int[G, G] scan ids. Labels come from a random subset of 2..G*G classes, so counts vary."""
  n = cfg.grid ** 2
  classes = rng.choice(10, size=rng.integers(2, min(10, n) + 1), replace=False)
  cell_labels = rng.choice(classes, size=n)
  return np.array([rng.choice(pools[c]) for c in cell_labels]).reshape(cfg.grid, cfg.grid)


def ask(category: str, grid_labels_GxG: np.ndarray, rng, want_yes: bool = True) -> tuple[str, str]:
  """(question, answer) of a category about a grid of labels."""
  flat = grid_labels_GxG.reshape(-1)
  present = sorted(set(flat.tolist()))
  if category == "cell":
    r, c = rng.integers(grid_labels_GxG.shape[0]), rng.integers(grid_labels_GxG.shape[1])
    return _CELL_Q.format(r=r + 1, c=c + 1), str(grid_labels_GxG[r, c])
  if category == "count":
    # A quarter absent digits (answer 0); otherwise a random cell's digit, so repeats are common.
    absent = [d for d in range(10) if d not in present]
    d = int(rng.choice(absent)) if absent and rng.random() < 0.25 else int(rng.choice(flat))
    return _COUNT_Q.format(d=d), str(int(np.sum(flat == d)))
  if category == "presence":
    absent = [d for d in range(10) if d not in present]
    yes = want_yes or not absent
    d = int(rng.choice(present if yes else absent))
    return _PRESENCE_Q.format(d=d), "yes" if yes else "no"
  raise ValueError(f"unknown category {category!r}")


def make_split(cfg: DigitsVQAConfig, split: str, n_images: int, seed: int,
               per_category: int = 1, with_labels: bool = False):
  """(images uint8[N, H, W], items) with items a list per image of (category, question, answer).

  Each image gets `per_category` questions of every category; presence answers alternate
  yes/no over the split (balanced, as in POPE). `with_labels` adds a third element, the digit
  of every cell, int[N, G, G] (training uses it for an auxiliary loss).
  """
  _, labels = _scans()
  pools = _pools(cfg, split)
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  images, items, grids, k = [], [], [], 0
  for _ in range(n_images):
    ids = sample_grid(cfg, pools, rng)
    tiles = rng.integers(cfg.tiles ** 2, size=ids.shape) if cfg.tiles > 1 else None
    images.append(render(cfg, ids, tiles))
    grids.append(labels[ids])
    qa = []
    for cat in CATEGORIES:
      for _ in range(per_category):
        qa.append((cat, *ask(cat, labels[ids], rng, want_yes=k % 2 == 0)))
        k += cat == "presence"
    items.append(qa)
  if with_labels:
    return np.stack(images), items, np.stack(grids)
  return np.stack(images), items


def training_set(cfg: DigitsVQAConfig, n_images: int, seed: int, per_category: int = 2,
                 with_labels: bool = False):
  """The in-memory training split (see `make_split`)."""
  return make_split(cfg, "train", n_images, seed, per_category, with_labels)


def write_split(cfg: DigitsVQAConfig, out, split: str = "test", n_images: int = 100,
                seed: int = 0) -> dict:
  """Writes OUT/images/*.png, OUT/questions.jsonl and OUT/answers.jsonl (the key), atomically.

  One question per category per image. Returns the paths {"questions", "answers", "images"}.
  """
  from PIL import Image

  from jaxmm.checkpoint import atomic_dir
  images, items = make_split(cfg, split, n_images, seed)
  questions, key = [], []
  with atomic_dir(out, overwrite=True) as tmp:
    (tmp / "images").mkdir()
    for i, (img, qa) in enumerate(zip(images, items)):
      name = f"{split}_{i:05d}.png"
      Image.fromarray(img).convert("RGB").save(tmp / "images" / name)
      for cat, q, a in qa:
        qid = len(questions)
        questions.append({"question_id": qid, "image": name, "text": q, "category": cat})
        key.append({"question_id": qid, "answer": a, "category": cat})
    vqa.write_jsonl(tmp / "questions.jsonl", questions)
    vqa.write_jsonl(tmp / "answers.jsonl", key)
  out = Path(out)
  return {"questions": out / "questions.jsonl", "answers": out / "answers.jsonl",
          "images": out / "images"}
