"""Orbax persistence: converted model folders and resumable training checkpoints.

A model folder (what `jaxmm convert` and training write, what `jaxmm.load` opens):
  jaxmm.json   {"format": 1, "family": ..., "config": {...}}
  params/      the params pytree (orbax)
  ...          tokenizer / processor files, copied verbatim
Writes are atomic: everything goes to a temporary sibling folder that is renamed at the end.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmm.errors import JaxmmError

META = "jaxmm.json"
FORMAT = 1


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
  """Yields a temporary folder that becomes `out` only if the block finishes without error."""
  out = Path(out).absolute()
  if out.exists() and not overwrite:
    raise JaxmmError(f"output folder {out} already exists (remove it or pass --overwrite)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if out.exists():
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
  os.rename(tmp, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def atomic_file(path, write) -> Path:
  """Calls write(tmp) on a temporary sibling of `path`, then renames it into place: a reader
  never sees a half-written file, and an error leaves the old file (if any) untouched."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
  os.close(fd)
  try:
    write(Path(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_json(path, obj, indent: int = 2) -> Path:
  """`obj` as JSON at `path`, atomically."""
  return atomic_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent)))


def write_params(folder, params) -> None:
  """Saves a params pytree (numpy or jax arrays) under folder/params with orbax (blocking).

  Nothing is copied on the way: orbax's default numpy handler deep-copies every array first, and
  compression makes tensorstore buffer each one; each about doubles the peak memory of a large
  conversion. Trained weights hardly compress anyway.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(Path(folder).absolute() / "params", args=ocp.args.PyTreeSave(params))


def save_model(out, family: str, config: dict, params, extra_files=(), overwrite=False) -> Path:
  """Atomically writes a model folder. `extra_files` are copied next to the params."""
  with atomic_dir(out, overwrite) as tmp:
    write_params(tmp, params)
    for f in extra_files:
      shutil.copy2(f, tmp / Path(f).name)
    (tmp / META).write_text(json.dumps({"format": FORMAT, "family": family, "config": config},
                                       indent=2))
  return Path(out)


def read_meta(path) -> dict:
  path = Path(path)
  meta_file = path / META
  if not path.is_dir():
    raise JaxmmError(f"model folder {path} does not exist")
  if not meta_file.is_file():
    raise JaxmmError(f"{path} is not a jaxmm model folder (no {META}); convert it with `jaxmm convert`")
  try:
    meta = json.loads(meta_file.read_text())
  except json.JSONDecodeError as e:
    raise JaxmmError(f"{meta_file} is corrupt: {e}") from None
  if meta.get("format") != FORMAT or "family" not in meta or "config" not in meta:
    raise JaxmmError(f"{meta_file} has an unsupported layout (format {meta.get('format')!r})")
  return meta


def load_params(path, dtype=None, shardings=None):
  """Restores the params pytree of a model folder as jax arrays. `shardings`: a tree of
  `jax.sharding.Sharding`s like the params' (see `jaxmm.sharding`): each leaf is read straight
  into its shards (in `dtype` when given)."""
  pdir = Path(path).absolute() / "params"
  if not pdir.is_dir():
    raise JaxmmError(f"{path} has no params/ folder")
  try:
    ckptr = ocp.StandardCheckpointer()
    target = None if shardings is None else _restore_target(ckptr.metadata(pdir), shardings, dtype)
    params = ckptr.restore(pdir, target)
  except JaxmmError:
    raise
  except Exception as e:  # orbax raises many types for a damaged folder
    raise JaxmmError(f"cannot read params from {pdir}: {type(e).__name__}: {e}") from None
  if dtype is not None and shardings is None:
    params = jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x,
                          params)
  return params


def _restore_target(meta, shardings, dtype):
  """ShapeDtypeStructs with shardings for orbax's restore (checks the trees agree)."""
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  from jaxmm import sharding as sharding_lib
  sharding_lib.check_tree(meta, shardings)

  def struct(m, s):
    dt = dtype if dtype is not None and np.issubdtype(m.dtype, np.floating) else m.dtype
    return jax.ShapeDtypeStruct(m.shape, dt, sharding=s)
  return jax.tree.map(struct, meta, shardings, is_leaf=lambda x: hasattr(x, "shape"))


def check_same_run(directory, mine: dict, saved: dict) -> None:
  """JaxmmError when a folder's saved run settings differ from this run's (the keys of `mine`)."""
  diff = sorted(k for k in mine if saved.get(k) != mine[k])
  if diff:
    raise JaxmmError(f"{directory} holds a different run (differs in {diff}); "
                     "use another --out folder or delete it")


class TrainCheckpointer:
  """Periodic, resumable training checkpoints: a state pytree plus JSON metadata per step.

  `restore_latest(template)` returns (step, state, meta) or None when nothing was saved. A run
  killed mid-save leaves no half checkpoint: orbax finalises a step by an atomic rename.
  """

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self._mgr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self):
    return self._mgr.latest_step()

  def save(self, step: int, state, meta: dict | None = None) -> None:
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta or {})))
    self._mgr.wait_until_finished()

  def restore_latest(self, template):
    step = self._mgr.latest_step()
    if step is None:
      return None
    out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                                          meta=ocp.args.JsonRestore()))
    return step, out["state"], dict(out["meta"])

  def close(self):
    self._mgr.close()
