"""Memory plan of a model on a device mesh: parameters and KV cache per device, from shapes only.

  jaxmm plan --config llava-1.5-7b --mesh data=2,model=4 --sharding fsdp [--batch 8 --seq 2048
             --dtype bfloat16] [--schedule S] [--visual N] [--json]

The model is built abstractly (`jax.eval_shape` of the family's `init_params`: no memory is
allocated) and each params leaf is divided as the sharding preset's rules say
(`jaxmm.sharding`). The KV cache is [layers, batch, length, kv heads, head dim] twice (keys and
values), split along `data` by the batch; under a pruning schedule each segment of layers holds
only the tokens left entering it.
"""
import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmm import config as config_lib
from jaxmm import flops as flops_lib
from jaxmm import registry, sharding
from jaxmm.errors import ConfigError
from jaxmm.pruning import schedule as schedule_lib

# name -> (family, preset function, default visual tokens of one prompt)
CONFIGS = {
    "llava-1.5-7b": ("llava", config_lib.llava15_7b, 576),
    "llava-1.5-13b": ("llava", config_lib.llava15_13b, 576),
    "llava-1.6-7b": ("llava_next", config_lib.llava16_7b, 2928),   # a 672 x 672 image
    "qwen2.5-vl-7b": ("qwen2_vl", config_lib.qwen25_vl_7b, 1024),  # a 896 x 896 image
    "qwen2.5-vl-72b": ("qwen2_vl", config_lib.qwen25_vl_72b, 1024),
}


def param_shapes(family: str, cfg) -> dict:
  """The params tree as ShapeDtypeStructs (f32), by abstract evaluation."""
  init = registry.family_module(family).init_params
  return jax.eval_shape(lambda k: init(cfg, k), jax.random.PRNGKey(0))


def shard_elems(shape, spec, sizes: dict) -> int:
  """Elements of one device's shard of an array of `shape` split by `spec`."""
  n = 1
  for d, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    n *= d // math.prod(sizes[a] for a in axes)
  return n


def param_bytes(family: str, cfg, preset: str, sizes: dict, itemsize: int) -> tuple[int, int]:
  """(parameter count, bytes of one device's params)."""
  shapes = param_shapes(family, cfg)
  specs = sharding.param_specs(registry.family_module(family).rules(cfg), preset, sizes)
  sharding.check_tree(shapes, specs)
  leaves = jax.tree.leaves(shapes)
  per = jax.tree.leaves(jax.tree.map(lambda s, p: shard_elems(s.shape, p, sizes), shapes, specs,
                                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  return sum(math.prod(x.shape) for x in leaves), sum(per) * itemsize


def kv_bytes(text_cfg, lengths, batch: int, data: int, itemsize: int) -> int:
  """Bytes of one device's keys and values (the batch split along `data` when it divides)."""
  per_b = batch // data if batch % data == 0 else batch
  return 2 * per_b * sum(lengths) * text_cfg.num_kv_heads * text_cfg.head_dim * itemsize


def folder_config(path) -> tuple[str, object, int]:
  """(family, config, default visual tokens) of a model folder (only its jaxmm.json is read)."""
  from jaxmm import checkpoint
  meta = checkpoint.read_meta(path)
  cfg = registry.family_module(meta["family"]).Config.from_dict(meta["config"])
  if not hasattr(cfg, "text") and not hasattr(cfg, "num_layers"):
    raise ConfigError(f"{path} holds a {meta['family']!r} model: plan covers decoder models")
  return meta["family"], cfg, getattr(cfg, "num_image_tokens", 0)


def plan(name: str, mesh: dict, preset: str, batch: int, seq: int | None, dtype: str,
         schedule=None, visual: int | None = None) -> dict:
  """The plan as a dict (what --json prints). `name`: one of CONFIGS, or a model folder.
  `seq` defaults to 2048, or the visual tokens plus 512 when they need more."""
  if name in CONFIGS:
    family, make, default_visual = CONFIGS[name]
    cfg = make()
  elif Path(name).is_dir():
    family, cfg, default_visual = folder_config(name)
  else:
    raise ConfigError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}, or a model folder")
  visual = default_visual if visual is None else visual
  seq = seq or max(2048, visual + 512)
  if visual > seq:
    raise ConfigError(f"--visual {visual} does not fit in --seq {seq}")
  itemsize = jnp.dtype(dtype).itemsize
  text = getattr(cfg, "text", cfg)
  n_params, p_bytes = param_bytes(family, cfg, preset, mesh, itemsize)
  sched = schedule_lib.parse(schedule) if schedule else ()
  # Every layer's KV length is its token count: the text plus the visual tokens it still holds.
  lengths = lambda s: flops_lib.tokens_per_layer(s, seq - visual, visual, text.num_layers)
  unpruned = kv_bytes(text, lengths(()), batch, mesh["data"], itemsize)
  pruned = kv_bytes(text, lengths(sched), batch, mesh["data"], itemsize)
  return {"config": name, "family": family, "mesh": mesh, "sharding": preset, "dtype": dtype,
          "batch": batch, "seq": seq, "visual": visual, "schedule": schedule or None,
          "params": n_params, "devices": math.prod(mesh.values()),
          "per_device_bytes": {"params": p_bytes, "kv_cache": pruned, "total": p_bytes + pruned},
          "kv_cache_unpruned_per_device_bytes": unpruned}


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def report(p: dict) -> str:
  mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [f"{p['config']} ({p['family']}): {p['params']:,} parameters",
           f"mesh {mesh} ({p['devices']} devices), sharding {p['sharding']}, {p['dtype']}",
           f"per device: params {_gib(p['per_device_bytes']['params'])}",
           f"per device: KV cache {_gib(p['kv_cache_unpruned_per_device_bytes'])} unpruned "
           f"(batch {p['batch']}, {p['seq']} tokens, {p['visual']} visual)"]
  if p["schedule"]:
    lines.append(f"per device: KV cache {_gib(p['per_device_bytes']['kv_cache'])} under "
                 f"{p['schedule']}")
  lines.append(f"per device: total {_gib(p['per_device_bytes']['total'])}")
  return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, metavar="CONFIG|FOLDER",
                 help=f"one of {', '.join(CONFIGS)}, or a jaxmm model folder")
  p.add_argument("--mesh", default="data=1,model=1", help="e.g. data=2,model=4")
  p.add_argument("--sharding", default="fsdp", choices=list(sharding.PRESETS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, help="tokens per prompt, text and visual (default 2048, or "
                 "the visual tokens + 512 when more)")
  p.add_argument("--visual", type=int, help="visual tokens per prompt (default: the config's "
                 "typical image, e.g. 576 for LLaVA-1.5)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--schedule", help="a pruning schedule, e.g. divprune@0:284,random@5:38")
  p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
  if args.batch < 1 or (args.seq is not None and args.seq < 1):
    raise ConfigError("--batch and --seq must be >= 1")
  p = plan(args.config, sharding.parse_mesh(args.mesh), args.sharding, args.batch, args.seq,
           args.dtype, args.schedule, args.visual)
  print(json.dumps(p) if args.json else report(p))
  return 0


if __name__ == "__main__":
  from jaxmm.cli import module_main
  raise SystemExit(module_main(__name__))
