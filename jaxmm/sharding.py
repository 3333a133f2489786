"""Sharding as data: logical axes per parameter, presets that map them onto a device mesh.

Every params leaf's logical axes come from its family's converter rule table (`Rule.axes`), the
one place that already lists every leaf and its shape. A preset maps logical names to mesh axes;
model code names no mesh axis: it calls `constrain(x, "batch", ...)` on the residual stream of
every decoder and CLIP layer and on the KV caches, which is a no-op unless a mesh is active
(`activate`).

Meshes have two axes, `data` (the batch) and `model`:
  dp    params replicated, the batch split along `data`;
  fsdp  every matrix split over all devices (`data` and `model`) along its first dimension
        that is a vocabulary or an embedding width, gathered by XLA where it is used; the batch
        split along `data`;
  tp    attention heads, MLP width and vocabulary split along `model` (Megatron-style), the
        batch along `data`.
A dimension that the mesh axes do not divide stays whole (replicated): `spec` says so.

Computations run with XLA's sharding propagation (GSPMD): a mesh made with explicit axis types
(`jax.make_mesh`'s default) is used with automatic ones (`auto`).
"""
import contextlib
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmm.converters.common import flatten, unflatten
from jaxmm.errors import ConfigError

MESH_AXES = ("data", "model")
LOGICAL = ("layers", "vocab", "embed", "heads", "kv", "mlp", "batch")
# Logical axis -> mesh axes, per preset. "layers" (the scanned stack) is never split.
PRESETS = {
    "dp": {"batch": ("data",)},
    "fsdp": {"batch": ("data",), "vocab": ("data", "model"), "embed": ("data", "model")},
    "tp": {"batch": ("data",), "heads": ("model",), "kv": ("model",), "mlp": ("model",),
           "vocab": ("model",)},
}
ACTIVATIONS = {"batch": ("data",)}   # what `constrain` pins, under every preset


def preset(name: str) -> dict:
  if name not in PRESETS:
    raise ConfigError(f"unknown sharding {name!r}; known: {', '.join(PRESETS)}")
  return PRESETS[name]


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,model=4' -> {"data": 2, "model": 4} (the CLIs' --mesh)."""
  sizes = {}
  for part in filter(None, text.replace(" ", "").split(",")):
    m = re.fullmatch(r"([a-z]+)=(\d+)", part)
    if not m or m[1] not in MESH_AXES or m[1] in sizes or int(m[2]) < 1:
      raise ConfigError(f"malformed --mesh {text!r}: expected e.g. data=2,model=4 "
                        f"(axes {' and '.join(MESH_AXES)}, each at most once, sizes >= 1)")
    sizes[m[1]] = int(m[2])
  if not sizes:
    raise ConfigError(f"malformed --mesh {text!r}: expected e.g. data=2,model=4")
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(sizes: dict[str, int]) -> Mesh:
  """A `data` x `model` mesh over this process's own devices (`jax.local_devices()`): under
  multi-host evaluation each process runs its share of the work on its devices."""
  devices = jax.local_devices()
  need = math.prod(sizes.values())
  if need != len(devices):
    raise ConfigError(f"a mesh of {need} devices ({sizes}) does not match the {len(devices)} "
                      "devices of this process")
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def add_args(p) -> None:
  """The commands' --mesh and --sharding options."""
  p.add_argument("--mesh", help="run on a device mesh, e.g. data=2,model=4 (this process's "
                 "devices: their count must equal the product)")
  p.add_argument("--sharding", default="fsdp", choices=list(PRESETS),
                 help="how params are split on the mesh (default fsdp)")


def mesh_from_args(args) -> Mesh | None:
  """The mesh of --mesh (None without it)."""
  return make_mesh(parse_mesh(args.mesh)) if getattr(args, "mesh", None) else None


def auto(mesh: Mesh) -> Mesh:
  """`mesh` with automatic axis types (XLA propagates shardings); checks its axis names."""
  missing = set(MESH_AXES) - set(mesh.axis_names)
  if missing:
    raise ConfigError(f"mesh axes {mesh.axis_names} lack {sorted(missing)}; jaxmm meshes have "
                      f"axes {MESH_AXES}")
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def spec(shape, axes, rules: dict, mesh_sizes: dict[str, int]) -> P:
  """The PartitionSpec of an array of `shape` with logical `axes` under preset `rules`.

  A mesh axis is used at most once per array (first dimension wins); a dimension its mesh axes
  do not divide stays whole.
  """
  used, out = set(), []
  for d, name in zip(shape, axes):
    mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh_sizes.get(a, 1) > 1)
    if mesh_axes and d % math.prod(mesh_sizes[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      out.append(None)
  return P(*out)


def logical_axes(rules) -> dict[str, tuple]:
  """{params path: (logical axes, leaf shape)} of a family's converter rule table."""
  out = {}
  for r in rules:
    axes = r.out_axes()
    if axes is None:
      raise ConfigError(f"params leaf {r.dst} has no logical axes (its converter rule declares "
                        "none), so it cannot be placed on a mesh")
    unknown = set(axes) - set(LOGICAL) - {None}
    if unknown:
      raise ConfigError(f"params leaf {r.dst}: unknown logical axes {sorted(unknown)}")
    out[r.dst] = (axes, r.out_shape())
  return out


def param_specs(rule_table, preset_name: str, mesh_sizes: dict[str, int]) -> dict:
  """The params tree of PartitionSpecs for a family's rule table under a preset."""
  rules = preset(preset_name)
  return unflatten({path: spec(shape, axes, rules, mesh_sizes)
                    for path, (axes, shape) in logical_axes(rule_table).items()})


def param_shardings(rule_table, mesh: Mesh, preset_name: str) -> dict:
  """The params tree of NamedShardings on `mesh`."""
  mesh = auto(mesh)
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(rule_table, preset_name, sizes),
                      is_leaf=lambda x: isinstance(x, P))


def check_tree(params, shardings) -> None:
  """A one-line error when the params tree and the rule table's tree differ."""
  have, want = set(flatten(params)), set(flatten(shardings))
  if have != want:
    extra, missing = sorted(have - want)[:3], sorted(want - have)[:3]
    raise ConfigError(f"params do not match the family's rule table (extra {extra}, missing "
                      f"{missing})")


def place(params, shardings):
  """`params` on the mesh, each leaf in its sharding (host arrays are copied shard by shard)."""
  check_tree(params, shardings)
  return jax.tree.map(jax.device_put, params, shardings)


# ---- activations ----------------------------------------------------------------------------

def active_mesh():
  """The mesh of the enclosing `activate`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or "data" not in mesh.axis_names else mesh


@contextlib.contextmanager
def activate(mesh: Mesh | None):
  """Runs the block with `mesh` as the current mesh (no-op for None). Jitted functions traced
  inside compile for it; `constrain` and `place_batch` apply only here."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(auto(mesh)):
    yield


def constrain(x, *axes):
  """`x` with its logical `axes` ("batch", None, ...) pinned to the active mesh (batch on
  `data`); unchanged without one, or when the mesh does not divide its batch."""
  mesh = active_mesh()
  if mesh is None:
    return x
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return jax.lax.with_sharding_constraint(x, spec(x.shape, axes, ACTIVATIONS, sizes))


def place_batch(arrays, batch: int):
  """A pytree of host input arrays on the active mesh: arrays whose leading dimension is the
  batch are split along `data` (when it divides the batch), the others replicated. Unchanged
  without a mesh."""
  if active_mesh() is None:
    return arrays
  mesh = jax.sharding.get_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

  def put(x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    axes = ("batch",) if x.ndim and x.shape[0] == batch else ()
    s = spec(x.shape, axes + (None,) * (x.ndim - len(axes)), ACTIVATIONS, sizes)
    return jax.device_put(x, NamedSharding(mesh, s))
  return jax.tree.map(put, arrays)
