"""Real digit domains for domain adaptation: MNIST (test 10k), USPS, UCI 8x8 (see the data README).

Protocols (issue 7):
  MNIST  only the official test 10k exists here: the first 8,000 are MNIST "train" (a labelled
         source, or an unlabelled target), the last 2,000 are MNIST "test".
  USPS   the official 7,291 / 2,007 train / test split.
  UCI    1,797 images with no official split: the first 1,500 train, the last 297 test.
All images are resized (bilinear) to size x size, one grey channel, scaled to [-1, 1]:
x f32[N, size, size, 1], y i32[N]. A user `.npz` (x_train, y_train, x_test, y_test; images
(N, H, W) or (N, H, W, 1), uint8 0..255 or float 0..1) can replace any domain.
"""
import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np

from jaxmm.data import data_path, data_root
from jaxmm.errors import InputError

TASKS = {"usps-mnist": ("usps", "mnist"), "mnist-usps": ("mnist", "usps"),
         "uci-usps": ("uci", "usps")}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class Domain:
  name: str
  x_train: np.ndarray  # f32[N, S, S, 1] in [-1, 1]
  y_train: np.ndarray  # i32[N]
  x_test: np.ndarray
  y_test: np.ndarray


def resize(x_NxHxW: np.ndarray, size: int) -> np.ndarray:
  """[0, 1] grey images -> f32[N, size, size, 1] in [-1, 1] (bilinear, antialiased when shrinking)."""
  x = jax.image.resize(np.asarray(x_NxHxW, np.float32), (len(x_NxHxW), size, size), "linear")
  return np.asarray(x)[..., None] * 2.0 - 1.0


def _domain(name, x_train, y_train, x_test, y_test, size) -> Domain:
  return Domain(name, resize(x_train, size), np.asarray(y_train, np.int32),
                resize(x_test, size), np.asarray(y_test, np.int32))


def load_builtin(name: str, size: int = 32) -> Domain:
  """One of "mnist", "usps", "uci" from the shared data folder (resized once, cached)."""
  return _load_builtin(str(data_root()), name, size)


@functools.lru_cache(maxsize=8)
def _load_builtin(root: str, name: str, size: int) -> Domain:
  del root  # part of the cache key only: data_path reads it from the environment
  if name == "mnist":
    d = np.load(data_path("digits", "mnist_test.npz"))
    x, y = d["x"] / 255.0, d["y"]
    return _domain(name, x[:8000], y[:8000], x[8000:], y[8000:], size)
  if name == "usps":
    d = np.load(data_path("digits", "usps.npz"))
    return _domain(name, d["x_train"] / 255.0, d["y_train"], d["x_test"] / 255.0, d["y_test"],
                   size)
  if name == "uci":
    d = np.load(data_path("digits", "uci_digits_8x8.npz"))
    x, y = d["x"] / 16.0, d["y"]
    return _domain(name, x[:1500], y[:1500], x[1500:], y[1500:], size)
  raise InputError(f"unknown digit domain {name!r}; known: mnist, usps, uci")


def _images(path, key, arr) -> np.ndarray:
  """Validates one image array of a user .npz -> f32[N, H, W] in [0, 1]."""
  if arr.ndim == 4 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 3:
    raise InputError(f"{path}: {key} has shape {arr.shape}; expected (N, H, W) or (N, H, W, 1)")
  if arr.dtype == np.uint8:
    return arr / 255.0
  arr = arr.astype(np.float32)
  if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
    raise InputError(f"{path}: float {key} must lie in [0, 1] (got {arr.min()}..{arr.max()})")
  return arr


def load_npz(path, size: int = 32, num_classes: int = 10) -> Domain:
  """A user-provided domain; clear errors for missing keys, mismatched sizes or labels."""
  path = Path(path)
  if not path.is_file():
    raise InputError(f"no such .npz file: {path}")
  d = np.load(path)
  missing = [k for k in NPZ_KEYS if k not in d.files]
  if missing:
    raise InputError(f"{path}: missing arrays {missing} (has {d.files}); need {list(NPZ_KEYS)}")
  xtr, xte = _images(path, "x_train", d["x_train"]), _images(path, "x_test", d["x_test"])
  if xtr.shape[1:] != xte.shape[1:]:
    raise InputError(f"{path}: image sizes differ: x_train is {xtr.shape[1]}x{xtr.shape[2]}, "
                     f"x_test is {xte.shape[1]}x{xte.shape[2]}")
  for xk, yk, x in (("x_train", "y_train", xtr), ("x_test", "y_test", xte)):
    y = d[yk]
    if y.shape != (len(x),):
      raise InputError(f"{path}: {yk} has shape {y.shape}; expected ({len(x)},) to match {xk}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise InputError(f"{path}: {yk} must be class ids in 0..{num_classes - 1}")
  return _domain(path.stem, xtr, d["y_train"], xte, d["y_test"], size)


def load_task(task: str, size: int = 32, source_npz=None, target_npz=None):
  """-> (source Domain, target Domain) for a task name; `.npz` paths replace either side."""
  if task not in TASKS:
    raise InputError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  src, tgt = TASKS[task]
  source = load_npz(source_npz, size) if source_npz else load_builtin(src, size)
  target = load_npz(target_npz, size) if target_npz else load_builtin(tgt, size)
  return source, target


class Stream:
  """Endless shuffled mini-batches; the order is a pure function of (seed, stream, epoch), so
  `state()` (epoch, position) is all a checkpoint needs to resume the exact same order."""

  def __init__(self, n: int, batch: int, seed: int, stream: int):
    if batch > n:
      raise InputError(f"batch size {batch} exceeds the {n} available images")
    self.n, self.batch, self.seed, self.stream = n, batch, seed, stream
    self.epoch, self.pos, self._perm = 0, 0, None

  def _permutation(self):
    if self._perm is None or self._perm[0] != self.epoch:
      rng = np.random.default_rng([self.seed, self.stream, self.epoch])
      self._perm = (self.epoch, rng.permutation(self.n))
    return self._perm[1]

  def next(self) -> np.ndarray:
    """Indices of the next batch; the last partial batch of an epoch is dropped."""
    if self.pos + self.batch > self.n:
      self.epoch, self.pos = self.epoch + 1, 0
    idx = self._permutation()[self.pos:self.pos + self.batch]
    self.pos += self.batch
    return idx

  def state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos}

  def restore(self, state: dict) -> None:
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
