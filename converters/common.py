"""The generic conversion engine: stream checkpoint tensors through declarative name tables.

A family converter is data: a list of `Rule`s mapping source tensor names to "/"-joined paths in
the jaxmm params tree, each with the expected source shape and a named, invertible transform.
`convert` checks the whole table against the checkpoint before reading any data (missing,
unknown and misshapen tensors are all reported at once), then streams the tensors shard by shard
into preallocated outputs, so peak memory is about the output plus one tensor. `export` is the
exact inverse, used to write Hugging Face checkpoints back.
"""
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxmm.errors import ConversionError

LAYER = "{i}"  # placeholder for the layer index in Rule.src


class Transform(NamedTuple):
  fwd: Callable[[np.ndarray], np.ndarray]  # source tensor -> jaxmm array
  inv: Callable[[np.ndarray], np.ndarray]  # jaxmm array -> source tensor


# Named transforms with their inverses. Adding one is a line.
TRANSFORMS = {
    "id": Transform(lambda x: x, lambda x: x),
    # torch Linear weight [out, in] -> Flax Dense kernel [in, out].
    "T": Transform(lambda x: x.T, lambda x: x.T),
    # torch Conv2d weight OIHW -> Flax Conv kernel HWIO.
    "conv": Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
    # torch Conv3d weight O,I,D,H,W -> Flax 3-D Conv kernel D,H,W,I,O.
    "conv3d": Transform(lambda x: x.transpose(2, 3, 4, 1, 0), lambda x: x.transpose(4, 3, 0, 1, 2)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One source tensor (or one per layer, when `src` holds "{i}") -> one params leaf.

  `shape` is the expected SOURCE shape (per layer for "{i}" rules), checked before `fn` applies.
  For "{i}" rules, `layers` layers are stacked along a new leading axis of the output.
  `axes`: the logical axis name (`jaxmm.sharding.LOGICAL`) of each dimension of the params leaf
  after `fn`, without the layer axis; None where a dimension is never split.
  """
  src: str
  dst: str
  shape: tuple[int, ...]
  fn: str = "id"
  layers: int | None = None
  axes: tuple[str | None, ...] | None = None

  def __post_init__(self):
    if self.fn not in TRANSFORMS:
      raise ValueError(f"rule {self.src}: unknown transform {self.fn!r}; known: {sorted(TRANSFORMS)}")
    if (LAYER in self.src) != (self.layers is not None):
      raise ValueError(f"rule {self.src}: '{LAYER}' in src and `layers` go together")
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    if self.axes is not None:
      object.__setattr__(self, "axes", tuple(self.axes))
      if len(self.axes) != len(self.shape):
        raise ValueError(f"rule {self.src}: {len(self.axes)} axes for a {len(self.shape)}-d tensor")

  def out_axes(self) -> tuple[str | None, ...] | None:
    """The logical axes of the params leaf ("layers" first for a stacked rule)."""
    if self.axes is None:
      return None
    return self.axes if self.layers is None else ("layers",) + self.axes

  def names(self) -> list[str]:
    """The concrete source names this rule reads, in layer order."""
    if self.layers is None:
      return [self.src]
    return [self.src.replace(LAYER, str(i)) for i in range(self.layers)]

  def out_shape(self) -> tuple[int, ...]:
    """Shape of the params leaf (after the transform, with the layer axis)."""
    probe = np.broadcast_to(np.zeros((), np.int8), self.shape)  # a view: no memory
    shape = TRANSFORMS[self.fn].fwd(probe).shape
    return shape if self.layers is None else (self.layers,) + shape


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a family converter returns: the jaxmm family and config, its rules, and the ignores."""
  family: str
  config: object              # a jaxmm config dataclass (has to_dict())
  rules: list[Rule]
  ignore: tuple[str, ...] = ()


# ---- reading checkpoints -----------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _as_numpy(x) -> np.ndarray:
  """numpy view of a torch tensor or array; half-precision floats widen to float32."""
  if hasattr(x, "detach"):  # a torch tensor; torch itself need not be imported here
    x = x.detach().cpu()
    if x.dtype.is_floating_point and x.element_size() < 4:
      x = x.float()
    x = x.numpy()
  x = np.asarray(x)
  return x.astype(np.float32) if x.dtype in _HALF else x


class _SafetensorsFile:
  """Reads one .safetensors file tensor by tensor with plain file reads.

  The format is parsed here (8-byte header length, JSON header, raw data) rather than through
  mmap so that resident memory holds one tensor at a time, and so a truncated file is reported
  by name before any data is read.
  """

  def __init__(self, path: Path):
    self.path = path
    size = path.stat().st_size
    try:
      with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
          raise ValueError(f"header of {n} bytes does not fit")
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
      raise ConversionError(f"{path} is not a readable safetensors file (header is not a dict)")
    header.pop("__metadata__", None)
    self.base = 8 + n
    self.meta = header
    for name, m in header.items():
      self._check_entry(name, m, size)

  def _check_entry(self, name: str, m, size: int) -> None:
    if isinstance(m, dict) and m.get("dtype") not in _ST_DTYPES:
      raise ConversionError(f"{self.path}: tensor {name} has unsupported dtype {m.get('dtype')}")
    try:
      start, end = m["data_offsets"]
      nbytes = int(np.prod(m["shape"])) * np.dtype(_ST_DTYPES[m["dtype"]]).itemsize
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f"{self.path}: corrupt header entry for tensor {name}: {m}") from None
    if end - start != nbytes:
      raise ConversionError(f"{self.path}: tensor {name} spans {end - start} bytes, its shape "
                            f"and dtype need {nbytes}")
    if self.base + end > size:
      raise ConversionError(f"{self.path} is truncated: tensor {name} needs {self.base + end} "
                            f"bytes, the file has {size}")

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self.meta[name]["shape"])

  def read(self, name) -> np.ndarray:
    m = self.meta[name]
    start, end = m["data_offsets"]
    out = np.empty(m["shape"], _ST_DTYPES[m["dtype"]])
    with open(self.path, "rb") as f:
      f.seek(self.base + start)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != end - start:
      raise ConversionError(f"{self.path} is truncated while reading tensor {name}")
    return out


class _TorchFile:
  """A pytorch_model*.bin file, loaded (memory-mapped where possible) on first use."""

  def __init__(self, path: Path):
    self.path = path
    self._sd = None

  def _load(self) -> dict:
    if self._sd is None:
      try:
        import torch  # only .bin checkpoints need torch
      except ImportError:
        raise ConversionError(f"reading {self.path} needs torch (pip install torch)") from None
      try:
        self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
      except Exception:  # legacy (non-zip) files cannot be mmapped; a corrupt one fails below
        try:
          self._sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
          raise ConversionError(f"{self.path} is not a readable PyTorch checkpoint "
                                f"({type(e).__name__}: {e})") from None
    return self._sd

  def keys(self) -> list[str]:
    return list(self._load())

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self._load()[name].shape)

  def read(self, name) -> np.ndarray:
    return _as_numpy(self._load()[name])

  def release(self) -> None:
    self._sd = None


class _DictFile:
  """An in-memory state dict posing as a checkpoint file."""

  def __init__(self, sd: dict):
    self.sd = dict(sd)

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self.sd[name].shape)

  def read(self, name) -> np.ndarray:
    return _as_numpy(self.sd[name])


_CHECKPOINT_FILES = ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin")


class TensorSource:
  """Lazily opened checkpoint tensors, streamed shard by shard.

  `get` returns numpy arrays; bfloat16/float16 tensors come back as float32.
  """

  def __init__(self, files: list, index: dict[str, int], label: str = "state dict"):
    self._files = files          # file objects, in file order
    self._index = index          # tensor name -> position in self._files
    self.label = label

  @classmethod
  def open(cls, src_dir) -> "TensorSource":
    """Opens a Hugging Face folder: one or sharded (indexed) safetensors or pytorch_model.bin."""
    src = Path(src_dir)
    for fname in _CHECKPOINT_FILES:
      if (src / fname).is_file():
        break
    else:
      raise ConversionError(f"{src} holds no checkpoint (looked for {', '.join(_CHECKPOINT_FILES)})")
    weight_map = _read_index(src / fname) if fname.endswith(".index.json") else None
    return cls._from_files(src, fname, weight_map)

  @classmethod
  def _from_files(cls, src: Path, fname: str, weight_map: dict | None) -> "TensorSource":
    """Opens the shards a `weight_map` (name -> shard file) lists, or the single file `fname`."""
    kind = _SafetensorsFile if ".safetensors" in fname else _TorchFile
    if weight_map is None:
      f = kind(src / fname)
      keys = f.meta if kind is _SafetensorsFile else f.keys()
      return cls([f], {k: 0 for k in keys}, str(src))
    files, index, pos = [], {}, {}
    for name, shard in weight_map.items():
      if shard not in pos:
        if not (src / shard).is_file():
          raise ConversionError(f"{src / fname} lists shard {shard}, which is missing")
        pos[shard] = len(files)
        files.append(kind(src / shard))
      index[name] = pos[shard]
    _check_index(files, index, src / fname)
    return cls(files, index, str(src))

  @classmethod
  def from_state_dict(cls, sd: dict) -> "TensorSource":
    """Wraps a dict of torch tensors or numpy arrays (one "shard")."""
    return cls([_DictFile(sd)], {k: 0 for k in sd})

  def names(self) -> list[str]:
    return list(self._index)

  def shards(self) -> Iterator[list[str]]:
    """Names grouped by file, in file order; a .bin file is dropped once its group is done."""
    for pos, f in enumerate(self._files):
      yield [n for n, p in self._index.items() if p == pos]
      if isinstance(f, _TorchFile):
        f.release()

  def shape(self, name) -> tuple[int, ...]:
    return self._files[self._index[name]].shape(name)

  def get(self, name) -> np.ndarray:
    x = self._files[self._index[name]].read(name)
    return x.astype(np.float32) if x.dtype in _HALF else x


def _read_index(path: Path) -> dict:
  try:
    weight_map = json.loads(path.read_text())["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{path} is not a valid checkpoint index ({type(e).__name__}: {e})") from None
  return dict(sorted(weight_map.items(), key=lambda kv: kv[1]))


def _check_index(files, index: dict, index_path: Path) -> None:
  """Every tensor the index places in a safetensors shard must be in that shard's header."""
  for name, pos in index.items():
    f = files[pos]
    if isinstance(f, _SafetensorsFile) and name not in f.meta:
      raise ConversionError(f"{index_path} places tensor {name} in {f.path.name}, which lacks it")


# ---- convert / export --------------------------------------------------------------------------

def _expand(rules: list[Rule]) -> dict[str, tuple[Rule, int | None]]:
  """Concrete source name -> (rule, layer index). Rejects tables that collide."""
  table, dsts = {}, set()
  for r in rules:
    if r.dst in dsts:
      raise ValueError(f"two rules write params leaf {r.dst}")
    dsts.add(r.dst)
    for i, name in enumerate(r.names()):
      if name in table:
        raise ValueError(f"two rules read tensor {name}")
      table[name] = (r, None if r.layers is None else i)
  return table


def _listing(names: list[str], k: int = 5) -> str:
  more = f" and {len(names) - k} more" if len(names) > k else ""
  return ", ".join(names[:k]) + more + f" ({len(names)} in all)"


def check(source: TensorSource, rules: list[Rule], ignore: tuple[str, ...] = ()) -> dict:
  """Validates names and shapes without reading data; returns the expanded table."""
  table = _expand(rules)
  present = source.names()
  have = set(present)
  skip = re.compile("|".join(f"(?:{p})" for p in ignore)) if ignore else None
  missing = [n for n in table if n not in have]
  if missing:
    raise ConversionError(f"{source.label}: missing tensor(s): {_listing(missing)}")
  unknown = [n for n in present if n not in table and not (skip and skip.search(n))]
  if unknown:
    raise ConversionError(f"{source.label}: unexpected tensor(s): {_listing(unknown)}")
  for shard in source.shards():  # shard by shard: a .bin file is released after its group
    for name in shard:
      if name in table and source.shape(name) != table[name][0].shape:
        raise ConversionError(f"tensor {name}: expected shape {table[name][0].shape}, "
                              f"got {source.shape(name)}")
  return table


def convert(source: TensorSource, rules: list[Rule], *, dtype=np.float32,
            ignore: tuple[str, ...] = (), progress: bool = False, shardings=None) -> dict:
  """Reads `source` through `rules` into a nested params dict of numpy arrays of `dtype`.

  `ignore` holds regexes (searched) of source names dropped silently. Raises ConversionError
  naming the tensor for missing, unexpected or misshapen tensors and unreadable files.
  `shardings` ({params path: jax Sharding}, e.g. from `jaxmm.sharding`): each tensor goes onto
  its devices as it is read (a layer of a stacked leaf into its slice), so the host holds one
  tensor at a time; the leaves are then jax arrays in those shardings.
  """
  table = check(source, rules, ignore)
  dtype = np.dtype(dtype)
  if shardings is None:
    out = {r.dst: np.empty(r.out_shape(), dtype) for r in rules}
  else:
    import jax.numpy as jnp  # only sharded conversion needs jax here
    out = {r.dst: jnp.zeros(r.out_shape(), dtype, device=shardings[r.dst]) for r in rules}
  bar = tqdm(total=len(table), desc="convert", unit="tensor", disable=not progress)
  for shard in source.shards():
    for name in shard:
      if name in table:
        rule, i = table[name]
        y = TRANSFORMS[rule.fn].fwd(source.get(name))
        if shardings is None:
          out[rule.dst][... if i is None else i] = y  # casts to dtype in place
        else:
          out[rule.dst] = _device_set(out[rule.dst], i, np.asarray(y, dtype))
        bar.update()
  bar.close()
  return unflatten(out)


def _device_set(a, i, y):
  """`a` with y at [i] (all of it for None), in `a`'s sharding; `a`'s buffers are donated."""
  import jax
  if i is None:
    return jax.device_put(y, a.sharding)
  return _layer_setter()(a, np.int32(i), y)


@functools.cache
def _layer_setter():
  import jax
  return jax.jit(lambda a, i, y: a.at[i].set(y), donate_argnums=0)


def export(params: dict, rules: list[Rule]) -> dict[str, np.ndarray]:
  """The inverse of `convert`: params tree -> source-named tensors (in the params' dtype)."""
  flat = flatten(params)
  extra = sorted(set(flat) - {r.dst for r in rules})
  if extra:
    raise ConversionError(f"params leaves not covered by the rules: {_listing(extra)}")
  out = {}
  for r in rules:
    if r.dst not in flat:
      raise ConversionError(f"params tree has no leaf {r.dst} (needed for {r.src})")
    x = np.asarray(flat[r.dst])
    if x.shape != r.out_shape():
      raise ConversionError(f"params leaf {r.dst}: expected shape {r.out_shape()}, got {x.shape}")
    parts = [x] if r.layers is None else list(x)
    for name, part in zip(r.names(), parts):
      out[name] = np.ascontiguousarray(TRANSFORMS[r.fn].inv(part))
  return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  flat = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      flat.update(flatten(v, path + "/"))
    else:
      flat[path] = v
  return flat


def unflatten(flat: dict[str, object]) -> dict:
  """{"a/b": x} -> {"a": {"b": x}}."""
  tree = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree
