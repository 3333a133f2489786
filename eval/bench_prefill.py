"""Prefill latency: jitted jaxmm vs eager transformers, side by side in one process.

The LLaVA-shaped config of `jaxmm.config.llava_bench()`: CLIP 336 px / patch 14 (576 visual
tokens), 6 layers, width 256; LLaMA 8 layers, width 512, 8 heads; batch 1, ~40 text tokens.
Both run the same random weights (converted from the torch model). Runs are interleaved and
repeated; medians and the ratio jaxmm/torch go to stdout and to `--out` (JSON).

  python -m jaxmm.eval.bench_prefill [--runs 7] [--text-tokens 40] [--out results/bench_prefill.json]
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


def timed(fn, runs):
  out = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", type=int, default=7)
  ap.add_argument("--text-tokens", type=int, default=40)
  ap.add_argument("--out", default="results/bench_prefill.json")
  args = ap.parse_args(argv)
  from jaxmm.models import llava
  model, cfg, params = build()
  params = jax.device_put(params)
  ids, px = prompt(cfg, args.text_tokens)
  ids_t, px_t = torch.tensor(ids, dtype=torch.long), torch.tensor(px)
  jax_fn = lambda: llava.forward(cfg, params, input_ids=ids, pixel_values=px).logits.block_until_ready()
  def torch_fn():
    with torch.no_grad():
      return model(input_ids=ids_t, pixel_values=px_t, use_cache=False).logits
  t0 = time.perf_counter(); jax_fn(); compile_s = time.perf_counter() - t0
  torch_fn()  # warm-up
  jx, th = [], []
  for _ in range(args.runs):  # interleaved, so drift hits both alike
    jx += timed(jax_fn, 1)
    th += timed(torch_fn, 1)
  diff = float(np.abs(np.asarray(jax_fn()) - torch_fn().numpy()).max())
  res = {"config": "llava_bench", "seq_len": int(ids.shape[1]), "visual_tokens": cfg.num_image_tokens,
         "runs": args.runs, "jaxmm_median_s": statistics.median(jx),
         "torch_median_s": statistics.median(th), "ratio_jaxmm_over_torch":
         statistics.median(jx) / statistics.median(th), "jaxmm_first_call_s": compile_s,
         "jaxmm_s": jx, "torch_s": th, "max_abs_logit_diff": diff,
         "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
         "jax_backend": jax.default_backend(), "machine": platform.machine()}
  print(f"prefill of {res['seq_len']} tokens ({res['visual_tokens']} visual), median of {args.runs}:")
  print(f"  jaxmm (jit)   {res['jaxmm_median_s'] * 1e3:8.1f} ms   (first call incl. compile {compile_s:.1f} s)")
  print(f"  torch (eager) {res['torch_median_s'] * 1e3:8.1f} ms")
  print(f"  ratio jaxmm/torch = {res['ratio_jaxmm_over_torch']:.2f}; max |logit diff| = {diff:.2e}")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(args.out, res)
  return res


if __name__ == "__main__":
  main()
