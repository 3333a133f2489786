"""Prefill latency: jitted jaxmm vs transformers (SDPA and eager), side by side in one process.

The LLaVA-shaped config of `jaxmm.config.llava_bench()`: CLIP 336 px / patch 14 (576 visual
tokens), 6 layers, width 256; LLaMA 8 layers, width 512, 8 heads; batch 1, ~40 text tokens.
All run the same random weights (converted from the torch model) and the prefill that
generation runs: vision tower, projector, the decoder filling its KV cache, and the logits of
the last position only (jaxmm's `generation._prefill`; transformers with `use_cache=True,
logits_to_keep=1`, as its `generate` calls it). Runs are interleaved and repeated; medians, the
ratios jaxmm / torch, and the share of this machine's matmul rate that each reaches (the
prefill's analytic FLOPs over the time, against a jitted f32 GEMM measured in the same
process) go to stdout and to `--out` (JSON).

With --schedules, the same whole prefill pruned (jaxmm only) is timed in the same interleaved
runs, and each schedule's time ratio to unpruned is set beside its analytic FLOPs ratio (the
whole prefill's, vision included): how closely latency tracks FLOPs.

  python -m jaxmm.eval.bench_prefill [--runs 9] [--text-tokens 40] [--schedules S ...]
                                     [--no-torch] [--out results/bench_prefill.json]
"""
import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import torch

from jaxmm import checkpoint
from jaxmm.eval import prune_bench


def hf_config(cfg):
  """transformers LlavaConfig equal to a jaxmm LlavaConfig (vision + text sizes)."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  v, t = cfg.vision, cfg.text
  vc = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                        image_size=v.image_size, patch_size=v.patch_size)
  tc = LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                   num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                   num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size)
  return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=cfg.image_token_id)


def build(seed=0):
  """(torch model, jaxmm config, jaxmm params) with the same random weights."""
  from jaxmm.converters.cli import convert_model
  from jaxmm import config as config_lib
  from transformers import LlavaForConditionalGeneration
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(hf_config(config_lib.llava_bench())).eval()
  return (model, *convert_model(model))


def prompt(cfg, n_text, seed=0):
  rng = np.random.default_rng(seed)
  pre = rng.integers(3, 32000, (1, 5))
  post = rng.integers(3, 32000, (1, n_text - 5))
  ids = np.concatenate([pre, np.full((1, cfg.num_image_tokens), cfg.image_token_id), post], 1)
  px = rng.standard_normal((1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
  return ids.astype(np.int32), px


def prefill_flops(cfg, seq_len: int, sched=()) -> int:
  """Analytic FLOPs (2 per multiply-add) of the whole prefill: CLIP up to its feature layer,
  the projector, the decoder ("gqa" form, full n x n attention products; `sched` a resolved
  schedule) and the last position's head. XLA's cost analysis counts a scanned layer stack's body once, so it cannot
  give this."""
  from jaxmm import flops as flops_lib
  v, t = cfg.vision, cfg.text
  n = v.num_patches + 1
  depth = max(l if l >= 0 else v.num_layers + 1 + l for l in cfg.feature_layers)
  clip_layer = 2 * n * 4 * v.hidden_size ** 2 + 4 * n * n * v.hidden_size \
      + 4 * n * v.hidden_size * v.intermediate_size
  patch = 2 * v.num_patches * v.num_channels * v.patch_size ** 2 * v.hidden_size
  d_in = v.hidden_size * len(cfg.feature_layers)
  proj = 2 * cfg.num_image_tokens * (d_in * t.hidden_size + t.hidden_size ** 2)
  dec = flops_lib.prefill_flops(sched, seq_len - cfg.num_image_tokens, cfg.num_image_tokens,
                                flops_lib.Dims.from_config(cfg), "gqa")
  return patch + depth * clip_layer + proj + dec + 2 * t.hidden_size * t.vocab_size


def torch_prefill(model, ids_t, px_t, attn: str):
  """transformers' prefill as `generate` runs it: KV cache on, last-position logits only. The
  runs of both attention implementations share one model, so each call sets its own."""
  def run():
    model.set_attn_implementation(attn)
    with torch.no_grad():
      return model(input_ids=ids_t, pixel_values=px_t, use_cache=True, logits_to_keep=1).logits
  return run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", type=int, default=9)
  ap.add_argument("--text-tokens", type=int, default=40)
  ap.add_argument("--schedules", nargs="*", default=[],
                  help="also time these pruned prefills (e.g. entropy@2:98)")
  ap.add_argument("--no-torch", action="store_true", help="skip transformers")
  ap.add_argument("--out", default="results/bench_prefill.json")
  args = ap.parse_args(argv)
  from jaxmm import generation, inputs as inputs_lib
  from jaxmm.models import core
  model, cfg, params = build()
  params = jax.device_put(params)
  ids, px = prompt(cfg, args.text_tokens)
  arrays = core.prepare("llava", cfg, {"input_ids": ids, "pixel_values": px}).arrays
  keys = inputs_lib.example_keys(0, 1)
  prepared = core.prepare("llava", cfg, {"input_ids": ids, "pixel_values": px})
  scheds = {s: core.resolve("llava", cfg, prepared, s) for s in args.schedules}
  run = lambda sched: lambda: jax.block_until_ready(
      generation._prefill("llava", cfg, params, arrays, keys, sched, 1))[0]
  jax_fn = run(())
  t0 = time.perf_counter(); jax_fn(); compile_s = time.perf_counter() - t0
  flops = prefill_flops(cfg, int(ids.shape[1]))
  ids_t, px_t = torch.tensor(ids, dtype=torch.long), torch.tensor(px)
  fns = {"jaxmm": jax_fn, **{f"jaxmm {s}": run(sc) for s, sc in scheds.items()}}
  if not args.no_torch:
    fns |= {f"torch_{a}": torch_prefill(model, ids_t, px_t, a) for a in ("sdpa", "eager")}
  # interleaved (after one warm-up call each), so drift hits all alike
  times = dict(zip(fns, prune_bench.interleaved(list(fns.values()), args.runs)))
  rate = prune_bench.matmul_gflops() * 1e9
  med = {k: statistics.median(v) for k, v in times.items()}
  pruned = {s: {"time_ratio": med[f"jaxmm {s}"] / med["jaxmm"],
                "flops_ratio": prefill_flops(cfg, int(ids.shape[1]), sc) / flops}
            for s, sc in scheds.items()}
  res = {"config": "llava_bench", "seq_len": int(ids.shape[1]),
         "visual_tokens": cfg.num_image_tokens, "runs": args.runs,
         "prefill": "vision + projector + decoder with KV cache + last-position logits",
         **{f"{k}_median_s": v for k, v in med.items()}, "pruned": pruned,
         "prefill_flops": flops, "matmul_flops_per_s": rate,
         "share_of_matmul_rate": {k: flops * pruned.get(k[6:], {}).get("flops_ratio", 1) / v / rate
                                  for k, v in med.items()},
         "jaxmm_first_call_s": compile_s, "times_s": times,
         "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
         "jax_backend": jax.default_backend(), "machine": platform.machine()}
  if not args.no_torch:
    res["max_abs_logit_diff"] = float(np.abs(np.asarray(jax_fn())
                                             - fns["torch_sdpa"]()[:, -1].numpy()).max())
    for a in ("sdpa", "eager"):
      res[f"ratio_jaxmm_over_torch_{a}"] = med["jaxmm"] / med[f"torch_{a}"]
  print(f"prefill of {res['seq_len']} tokens ({res['visual_tokens']} visual; KV cache on, last "
        f"logits only), median of {args.runs} interleaved runs:")
  for k, v in med.items():
    print(f"  {k:<12} {v * 1e3:8.1f} ms   {100 * res['share_of_matmul_rate'][k]:5.1f}% of the "
          f"matmul rate")
  if not args.no_torch:
    print(f"  jaxmm / torch sdpa = {res['ratio_jaxmm_over_torch_sdpa']:.3f}, / torch eager = "
          f"{res['ratio_jaxmm_over_torch_eager']:.3f}; max |logit diff| = "
          f"{res['max_abs_logit_diff']:.2e}")
  for s, r in pruned.items():
    print(f"  {s:<28} time {r['time_ratio']:.3f} of unpruned, FLOPs {r['flops_ratio']:.3f} "
          f"(gap {r['time_ratio'] - r['flops_ratio']:+.3f})")
  print(f"  {flops / 1e9:.1f} GFLOP (analytic); matmul rate {rate / 1e9:.0f} GFLOP/s (jitted f32 "
        f"2048^2 GEMM); jaxmm first call incl. compile {compile_s:.1f} s")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(args.out, res)
  return res


if __name__ == "__main__":
  main()
