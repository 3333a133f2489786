"""Pruning on LLaVA-NeXT- and Qwen2.5-VL-shaped random models: prefill latency and FLOPs.

  python -m jaxmm.eval.bench_families --family llava_next|qwen2_5_vl [--runs 7] [--out JSON]

Random weights (`family.init_params`) at the llava_bench widths (a 6-layer 256-wide vision
tower, an 8-layer 512-wide decoder; Qwen: GQA 8/2 heads, window attention), one synthetic
prompt whose visual block has a real model's token count (LLaVA-NeXT: a 448x672 image, anyres
base + 2x2 tiles unpadded, 2,144 tokens; Qwen2.5-VL: a 672x672 image, 576 tokens). Per schedule,
in one process, runs interleaved: the median whole prefill (vision tower, projector, decoder,
last-token logits) and the median decoder prefill (from the merged embeddings), each as a ratio
to unpruned, beside the analytic decoder FLOPs ratio (convention B, and the exact GQA form).
Prints a Markdown table; writes JSON (default results/bench_families_FAMILY.json).
"""
import argparse
import functools
import platform
import statistics

import jax
import numpy as np

from jaxmm import checkpoint, config as config_lib, flops, registry
from jaxmm.eval import prune_bench
from jaxmm.models import core, segments
from jaxmm.pruning import schedule as schedule_lib

IMAGE_SIZE = {"llava_next": (448, 672), "qwen2_5_vl": (672, 672)}   # (height, width) px


def bench_config(family: str):
  """The family's config at the llava_bench widths."""
  bench = config_lib.llava_bench()
  if family == "llava_next":
    return config_lib.LlavaNextConfig(vision=bench.vision, text=bench.text)
  vision = config_lib.Qwen2VLVisionConfig(
      variant="qwen2_5_vl", depth=6, hidden_size=256, intermediate_size=688, num_heads=8,
      out_hidden_size=512, hidden_act="silu", fullatt_block_indexes=(2, 5))
  text = config_lib.Qwen2Config(vocab_size=32064, hidden_size=512, intermediate_size=1376,
                                num_layers=8, num_heads=8, num_kv_heads=2, mrope_section=(8, 12, 12))
  return config_lib.Qwen2VLConfig(vision=vision, text=text, model_type="qwen2_5_vl",
                                  image_token_id=32001, video_token_id=32002,
                                  vision_start_token_id=32003, vision_end_token_id=32004)


def _llava_next_inputs(cfg, rng, h, w):
  from jaxmm.models import llava_next
  n, tiles = llava_next.num_features(cfg, (h, w)), llava_next.num_tiles(cfg, (h, w))
  s = cfg.vision.image_size
  ids = np.concatenate([rng.integers(3, 32000, 5), np.full(n, cfg.image_token_id),
                        rng.integers(3, 32000, 35)])[None]
  px = rng.standard_normal((1, tiles, 3, s, s)).astype(np.float32)
  return {"input_ids": ids, "pixel_values": px, "image_sizes": np.array([[h, w]])}


def _qwen_inputs(cfg, rng, h, w):
  v = cfg.vision
  grid = np.array([[1, h // v.patch_size, w // v.patch_size]])
  n = int(grid.prod()) // v.spatial_merge_size ** 2
  ids = np.concatenate([rng.integers(3, 32000, 5), [cfg.vision_start_token_id],
                        np.full(n, cfg.image_token_id), [cfg.vision_end_token_id],
                        rng.integers(3, 32000, 35)])[None]
  px = rng.standard_normal((int(grid.prod()), v.patch_dim)).astype(np.float32)
  return {"input_ids": ids, "pixel_values": px, "image_grid_thw": grid}


def synthetic_inputs(family: str, cfg, seed: int = 0) -> dict:
  """One prompt: 5 text tokens, the image's placeholders (Qwen: inside vision start/end), 35
  more text tokens; random pixels of the family's layout."""
  make = _llava_next_inputs if family == "llava_next" else _qwen_inputs
  return make(cfg, np.random.default_rng(seed), *IMAGE_SIZE[family])


@functools.partial(jax.jit, static_argnames=("name", "cfg", "sched"))
def whole_prefill(name, cfg, params, arrays, keys, sched):
  """Last-position logits f32[B, V] of the whole prefill (vision included)."""
  state = registry.family_module(name).token_state(cfg, params, arrays)
  dec, dp = core.decoder_of(name, cfg, params)
  pre = segments.prefill(dec, dp, state, sched, keys)
  return dec.logits(dp, pre.segments[-1].state.hidden[:, -1:])[:, 0]


def schedules(family: str, n_vis: int, num_layers: int) -> list:
  """Each method at two keeps: 320 and 160 of LLaVA-NeXT's block (pruning.md §3.2 uses K=2),
  50% and 25% of Qwen2.5-VL's (EntropyPrune at K=1, its setting for Qwen2.5-VL; positions
  `preserve`, the only convention defined for M-RoPE)."""
  keeps = ("320", "160") if family == "llava_next" else ("50%", "25%")
  k_ent = 2 if family == "llava_next" else 1
  pos = None if family == "llava_next" else "preserve"
  out = []
  for keep in keeps:
    for text in (f"entropy@{k_ent}:{keep}", f"fastv@2:{keep}", f"random@2:{keep}",
                 f"divprune@0:{keep}"):
      out.append(schedule_lib.resolve(schedule_lib.parse(text, pos), n_vis, num_layers))
  return out


def run_family(family: str, runs: int, seed: int = 0) -> dict:
  name = "llava_next" if family == "llava_next" else "qwen2_vl"
  cfg = bench_config(family)
  fam = registry.family_module(name)
  params = jax.jit(lambda k: fam.init_params(cfg, k))(jax.random.key(seed))
  prepared = core.prepare(name, cfg, synthetic_inputs(family, cfg, seed))
  n_vis, n_text = int(prepared.visual_B[0]), int(prepared.text_B[0])
  dec, dp = core.decoder_of(name, cfg, params)
  keys = jax.random.split(jax.random.key(seed), 1)
  state = fam.token_state(cfg, params, prepared.arrays)
  scheds = [()] + schedules(family, n_vis, dec.num_layers)
  whole = [functools.partial(whole_prefill, name, cfg, params, prepared.arrays, keys, s)
           for s in scheds]
  decoder = [functools.partial(prune_bench.decoder_prefill, dec, dp, state, keys, s)
             for s in scheds]
  t_whole = prune_bench.interleaved(whole, runs)
  t_dec = prune_bench.interleaved(decoder, runs)
  dims = flops.Dims.from_config(cfg)
  rows = []
  for s, tw, td in zip(scheds, t_whole, t_dec):
    rows.append({"schedule": ",".join(map(str, s)) or "unpruned",
                 "average_visual": schedule_lib.average_visual(s, dims.num_layers) if s else n_vis,
                 "whole_s": statistics.median(tw), "decoder_s": statistics.median(td),
                 "flops_ratio_B": 1 - flops.reduction(s, n_text, n_vis, dims, "B"),
                 "flops_ratio_gqa": 1 - flops.reduction(s, n_text, n_vis, dims, "gqa")})
  for r in rows:
    r["whole_ratio"] = r["whole_s"] / rows[0]["whole_s"]
    r["decoder_ratio"] = r["decoder_s"] / rows[0]["decoder_s"]
  return {"family": family, "visual_tokens": n_vis, "text_tokens": n_text,
          "image_size_hw": IMAGE_SIZE[family], "runs": runs, "rows": rows,
          "matmul_gflops": prune_bench.matmul_gflops(), "machine": platform.machine(),
          "jax_backend": jax.default_backend()}


def markdown(res: dict) -> str:
  lines = ["| schedule | avg visual | whole prefill ms | x unpruned | decoder ms | x unpruned "
           "| FLOPs ratio (B) | FLOPs ratio (GQA) |", "| --- | ---: | ---: | ---: | ---: | ---: "
           "| ---: | ---: |"]
  for r in res["rows"]:
    lines.append(f"| `{r['schedule']}` | {r['average_visual']:.0f} | {1e3 * r['whole_s']:.1f} | "
                 f"{r['whole_ratio']:.3f} | {1e3 * r['decoder_s']:.1f} | {r['decoder_ratio']:.3f} "
                 f"| {r['flops_ratio_B']:.3f} | {r['flops_ratio_gqa']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--family", choices=sorted(IMAGE_SIZE), required=True)
  ap.add_argument("--runs", type=int, default=7)
  ap.add_argument("--out")
  args = ap.parse_args(argv)
  res = run_family(args.family, args.runs)
  print(f"{args.family}: {res['visual_tokens']} visual + {res['text_tokens']} text tokens, "
        f"medians of {args.runs} interleaved runs, matmul {res['matmul_gflops']:.0f} GFLOP/s")
  print(markdown(res))
  checkpoint.write_json(args.out or f"results/bench_families_{args.family}.json", res)
  return res


if __name__ == "__main__":
  main()
