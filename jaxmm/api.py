"""The public API: load a converted folder, run the forward, generate."""
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxmm import checkpoint, registry
from jaxmm import sharding as sharding_lib
from jaxmm.errors import JaxmmError
from jaxmm.layers import attention as attention_lib


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: its family, frozen config and params pytree (plus where it came from)."""
  family: str
  config: Any
  params: Any
  path: Path | None = None
  mesh: Any = None            # a jax.sharding.Mesh the params live on (None: one device)
  sharding: str | None = None  # its preset (`jaxmm.sharding.PRESETS`)


def load(path, dtype=None, family: str | None = None, mesh=None, sharding: str = "fsdp",
         attention: str | None = None) -> Model:
  """Opens a model folder of any family in `registry.FAMILIES`, written by `jaxmm convert` or by
  training. `dtype` casts float params. `family`: the family the caller expects; a folder of
  another family is a one-line JaxmmError, raised before any params are read.

  `mesh` (axes "data" and "model", e.g. `jax.make_mesh((2, 4), ("data", "model"))`): each
  params leaf is restored straight into its sharding under the `sharding` preset (dp, fsdp, tp;
  see `jaxmm.sharding`), never whole on one device; `forward` and `generate` then split the
  batch along `data`.

  `attention`: the decoder's attention kernel ("xla", "dot", "cudnn"; see
  `jaxmm.layers.attention.IMPLEMENTATIONS`), default as stored ("xla").

  `config` is the family module's `Config.from_dict` of the folder's stored config.
  """
  if attention is not None:
    attention_lib.check_implementation(attention)
  meta = checkpoint.read_meta(path)
  if family is not None and meta["family"] != family:
    raise JaxmmError(f"{path} holds a {meta['family']!r} model, not a {family!r} one")
  mod = registry.family_module(meta["family"])
  cfg = mod.Config.from_dict(meta["config"])
  shardings = None
  if mesh is not None:
    mesh = sharding_lib.auto(mesh)
    shardings = sharding_lib.param_shardings(mod.rules(cfg), mesh, sharding)
  params = checkpoint.load_params(path, dtype=dtype, shardings=shardings)
  # Compute in the dtype the params are stored in (e.g. a `--dtype bfloat16` conversion).
  leaf = next(x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
  cfg = with_dtype(cfg, jnp.dtype(leaf.dtype).name)
  if attention is not None:
    cfg = with_text(cfg, attention=attention)
  return Model(meta["family"], cfg, params, Path(path), mesh,
               sharding if mesh is not None else None)


def shard(m: Model, mesh, sharding: str = "fsdp") -> Model:
  """`m` with its params placed on `mesh` under the `sharding` preset (for an in-memory model;
  `load(..., mesh=)` restores a folder straight into place)."""
  mesh = sharding_lib.auto(mesh)
  rules = registry.family_module(m.family).rules(m.config)
  params = sharding_lib.place(m.params, sharding_lib.param_shardings(rules, mesh, sharding))
  return dataclasses.replace(m, params=params, mesh=mesh, sharding=sharding)


def with_text(cfg, **fields):
  """The config with these decoder fields replaced (a vision-language config's `text`; a
  decoder config itself); configs without them are returned as they are."""
  if hasattr(cfg, "text") and all(hasattr(cfg.text, f) for f in fields):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **fields))
  return dataclasses.replace(cfg, **fields) if all(hasattr(cfg, f) for f in fields) else cfg


def with_dtype(cfg, dtype: str):
  """The config with its compute dtype set (for LLaVA: the language model's)."""
  return with_text(cfg, dtype=dtype)


def forward(m: Model, **inputs):
  """Runs the family's jitted forward; returns its output dataclass (e.g. `.logits`). On a
  model with a mesh, the batch is split along `data`."""
  with sharding_lib.activate(m.mesh):
    return registry.family_module(m.family).forward(m.config, m.params, **inputs)


def generate(m: Model, **inputs):
  """Greedy generation with a KV cache; see `jaxmm.generation.generate`."""
  from jaxmm import generation  # local import: generation imports the model modules
  with sharding_lib.activate(m.mesh):
    return generation.generate(m.config, m.params, **inputs)
