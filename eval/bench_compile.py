"""Compile time of the generation prefill of a LLaVA-1.5-7B-shaped model, by depth.

  python -m jaxmm.eval.bench_compile [--layers 8 16 32] [--dtype bfloat16]
                                     [--schedules "" entropy@2:98] [--out results/bench_compile.json]

Params are abstract (`jax.eval_shape` of `init_params`: nothing is allocated); the prompt is one
336 px image (576 visual tokens) in a 616-token conversation. For each depth and schedule the
jitted prefill (`generation._prefill`: vision tower, projector, decoder segments with their KV
caches, last-token logits) is lowered and compiled once, timed with `time.perf_counter`. The
decoder layers are one `lax.scan` per segment, so the program, and its compile time, should not
grow with depth.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import checkpoint, config as config_lib, generation, inputs as inputs_lib
from jaxmm.models import core, llava


def model_config(layers: int, dtype: str, cfg=None):
  cfg = cfg or config_lib.llava15_7b()
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers,
                                                           dtype=dtype))


def abstract_params(cfg, dtype: str):
  shapes = jax.eval_shape(lambda k: llava.init_params(cfg, k), jax.random.PRNGKey(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)


def prompt(cfg, text_tokens: int = 40) -> dict:
  """One image's placeholders between text: transformers' input names, NumPy."""
  n, v = cfg.num_image_tokens, cfg.vision
  ids = np.full((1, text_tokens + n), 5, np.int64)
  start = min(8, text_tokens // 2)
  ids[0, start:start + n] = cfg.image_token_id
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "pixel_values": np.zeros((1, 3, v.image_size, v.image_size), np.float32)}


def compile_seconds(cfg, params, inputs: dict, schedule: str, max_new: int = 32) -> dict:
  """{"lower_s", "compile_s"} of the jitted prefill for this config and schedule."""
  prepared = core.prepare("llava", cfg, inputs)
  sched = core.resolve("llava", cfg, prepared, schedule or None)
  keys = inputs_lib.example_keys(0, 1)
  t0 = time.perf_counter()
  lowered = generation._prefill.lower("llava", cfg, params, prepared.arrays, keys, sched, max_new)
  t1 = time.perf_counter()
  lowered.compile()
  return {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
  p.add_argument("--schedules", nargs="+", default=["", "entropy@2:98"])
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--out", default="results/bench_compile.json")
  args = p.parse_args(argv)
  rows = []
  for layers in args.layers:
    cfg = model_config(layers, args.dtype)
    params = abstract_params(cfg, args.dtype)
    for s in args.schedules:
      jax.clear_caches()   # every compile from scratch
      r = {"layers": layers, "schedule": s or "unpruned", **compile_seconds(cfg, params,
                                                                            prompt(cfg), s)}
      print(f"{layers:3d} layers  {r['schedule']:<14} lower {r['lower_s']:6.2f} s  "
            f"compile {r['compile_s']:6.2f} s", flush=True)
      rows.append(r)
  res = {"config": "llava-1.5-7b shape", "dtype": args.dtype, "backend": jax.default_backend(),
         "rows": rows}
  checkpoint.write_json(Path(args.out), res)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
