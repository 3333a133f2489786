"""Accelerator benchmark: LLaVA-1.5-7B- and Qwen2.5-VL-7B-shaped models with random weights.

  python -m jaxmm.eval.bench_accel [--models llava15_7b qwen25_vl_7b] [--attention xla dot]
      [--dtype bfloat16] [--runs 5] [--budgets 192 128 64] [--decode-batches 1 16]
      [--decode-tokens 32] [--peak-tflops T] [--scale full|tiny] [--torch]
      [--out results/bench_accel.json]

Params are random (normal, std 0.02; norm scales 1) and made leaf by leaf on the default device
in --dtype: nothing is converted or read from disk. The prompt is one image (LLaVA: 336 px, 576
visual tokens; Qwen2.5-VL: 672 x 672 px, 576 merged tokens) between 5 and 35 random text tokens.
Per model and attention kernel (`jaxmm.layers.attention.IMPLEMENTATIONS`):
  - compile_s: lowering + compiling the whole prefill (vision tower, projector, decoder, last
    position's logits), unpruned;
  - prefill_ms and MFU: the median whole prefill; MFU = analytic FLOPs / time / peak, with the
    FLOPs of the vision tower as 2 x its params x patches plus its attention products, the
    decoder in the exact GQA form, and the last position's head; the peak from --peak-tflops,
    else the device kind's dense bf16 figure (H100/H200 989, A100 312, TPU v4 275, v5e 197,
    v5p 459, v6e 918 TFLOP/s), else (CPU) the f32 matmul rate measured in the same process;
  - speedup at each layer-averaged budget (EntropyPrune's 192 / 128 / 64 of 576, scaled to the
    model's visual tokens): `entropy@2:k` from `schedule.from_budget`, median prefill unpruned
    over pruned, all schedules' runs interleaved;
  - decode tokens/s at each batch: greedy generation with EOS off, (t(1 + N) - t(1)) / N per
    step for N = --decode-tokens;
  - KV-cache bytes of one prompt plus the decoded tokens, unpruned and at each budget.
With --torch and transformers present, the LLaVA model also runs in transformers with SDPA (and
FlashAttention-2 when the flash_attn package is installed) on the same device (cuda when torch
sees one, else cpu), with the same random-init shape and `logits_to_keep=1`, interleaved with
jaxmm's unpruned prefill. --scale tiny shrinks every width and depth (for the CPU test).
Prints a Markdown table; writes JSON.
"""
import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmm.cli
from jaxmm import checkpoint, config as config_lib, flops, generation, registry
from jaxmm import inputs as inputs_lib
from jaxmm.api import with_text
from jaxmm.errors import InputError
from jaxmm.eval import bench_compile, bench_families, bench_prefill, prune_bench
from jaxmm.layers import attention as attention_lib
from jaxmm.models import core
from jaxmm.pruning import schedule as schedule_lib

MODELS = {"llava15_7b": ("llava", config_lib.llava15_7b),
          "qwen25_vl_7b": ("qwen2_vl", config_lib.qwen25_vl_7b)}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "TPU v4": 275, "TPU v5 lite": 197,
               "TPU v5e": 197, "TPU v5p": 459, "TPU v6 lite": 918, "TPU v6e": 918}
REFERENCE_VISUAL = 576      # the budgets are given for LLaVA-1.5's 576 visual tokens
QWEN_IMAGE = {"full": (672, 672), "tiny": (112, 112)}


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--attention", nargs="+", default=["xla", "dot"],
                 choices=attention_lib.IMPLEMENTATIONS)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--runs", type=int, default=5, help="interleaved timing runs (medians)")
  p.add_argument("--budgets", type=int, nargs="*", default=[192, 128, 64],
                 help="layer-averaged visual tokens of 576, scaled to the model's count")
  p.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16])
  p.add_argument("--decode-tokens", type=int, default=32)
  p.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU")
  p.add_argument("--scale", choices=("full", "tiny"), default="full")
  p.add_argument("--torch", action="store_true", help="also time transformers (LLaVA)")
  p.add_argument("--out", default="results/bench_accel.json")


# ---- models and inputs --------------------------------------------------------------------------

def tiny(name: str, cfg):
  """`cfg` at test size: the same structure, widths small; 24 decoder layers so that K = 2
  can meet the smallest budget (the layers before K alone average 2/24 of the tokens)."""
  if name == "llava":
    v = dataclasses.replace(cfg.vision, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, image_size=56, patch_size=7)
    t = dataclasses.replace(cfg.text, hidden_size=64, intermediate_size=128, num_layers=24,
                            num_heads=4, num_kv_heads=2, head_dim=16)
    return dataclasses.replace(cfg, vision=v, text=t)
  v = dataclasses.replace(cfg.vision, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=64, fullatt_block_indexes=(1,))
  t = dataclasses.replace(cfg.text, hidden_size=64, intermediate_size=128, num_layers=24,
                          num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3))
  return dataclasses.replace(cfg, vision=v, text=t)


def model_config(key: str, scale: str, dtype: str, attention: str):
  name, preset = MODELS[key]
  cfg = preset() if scale == "full" else tiny(name, preset())
  return name, with_text(cfg, dtype=dtype, attention=attention)


def random_params(name: str, cfg, dtype: str, seed: int = 0):
  """Random params of the family's shapes in `dtype`, made leaf by leaf on the device."""
  shapes = jax.eval_shape(lambda k: registry.family_module(name).init_params(cfg, k),
                          jax.random.key(0))
  paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed), len(paths))

  def leaf(path, s, key):
    if "norm" in jax.tree_util.keystr(path).lower():
      return jnp.ones(s.shape, dtype)
    return jax.jit(lambda k: 0.02 * jax.random.normal(k, s.shape, dtype))(key)
  return jax.tree.unflatten(tree, [leaf(p, s, k) for (p, s), k in zip(paths, keys)])


def prompt(name: str, cfg, scale: str) -> dict:
  """One image between random text tokens, transformers' input names (NumPy)."""
  if name == "llava":
    inputs = bench_compile.prompt(cfg)
    inputs["pixel_values"] = np.random.default_rng(0).standard_normal(
        inputs["pixel_values"].shape).astype(np.float32)
    return inputs
  inputs = bench_families._qwen_inputs(cfg, np.random.default_rng(0), *QWEN_IMAGE[scale])
  inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
  return inputs


def batched(name: str, inputs: dict, b: int) -> dict:
  """The prompt repeated `b` times (Qwen's flattened patches and grids repeat per image)."""
  out = {k: np.repeat(v, b, axis=0) for k, v in inputs.items()
         if k in ("input_ids", "attention_mask")}
  if name == "llava":
    out["pixel_values"] = np.repeat(inputs["pixel_values"], b, axis=0)
  else:
    out["pixel_values"] = np.tile(inputs["pixel_values"], (b, 1))
    out["image_grid_thw"] = np.tile(inputs["image_grid_thw"], (b, 1))
  return out


# ---- FLOPs and bytes ----------------------------------------------------------------------------

def vision_flops(name: str, cfg, params, patches: int) -> int:
  """2 x vision-tower params x patches, plus its attention products (4 n^2 d per block; Qwen's
  windows counted as full, an upper bound)."""
  n_params = sum(x.size for x in jax.tree.leaves(params["vision"]))
  if name == "llava":
    d, blocks = cfg.vision.hidden_size, cfg.vision.num_layers
  else:
    d, blocks = cfg.vision.hidden_size, cfg.vision.depth
  return 2 * n_params * patches + 4 * patches * patches * d * blocks


def analytic_flops(name: str, cfg, params, n_text: int, n_visual: int, patches: int,
                   sched=()) -> int:
  """Whole-prefill FLOPs: vision tower (and projector) + decoder (exact GQA) + last head."""
  t = cfg.text
  dec = flops.prefill_flops(sched, n_text, n_visual, flops.Dims.from_config(cfg), "gqa")
  return vision_flops(name, cfg, params, patches) + dec + 2 * t.hidden_size * t.vocab_size


def kv_bytes(cfg, sched, n_text: int, n_visual: int, new_tokens: int, dtype: str) -> int:
  """Bytes of the K and V caches of one prompt plus `new_tokens`, per layer's kept tokens."""
  t = cfg.text
  per_token = 2 * t.num_kv_heads * t.head_dim * jnp.dtype(dtype).itemsize
  counts = flops.tokens_per_layer(sched, n_text, n_visual, t.num_layers)
  return int(sum(n + new_tokens for n in counts) * per_token)


def peak_flops(explicit: float | None) -> tuple[float, str]:
  """(FLOP/s, where the figure comes from)."""
  if explicit:
    return explicit * 1e12, "--peak-tflops"
  kind = jax.devices()[0].device_kind
  for k, tf in PEAK_TFLOPS.items():
    if k.lower() in kind.lower():
      return tf * 1e12, f"{kind}: dense bf16 peak {tf} TFLOP/s"
  rate = prune_bench.matmul_gflops()
  return rate * 1e9, f"{kind}: f32 matmul measured at {rate:.0f} GFLOP/s"


# ---- timings ------------------------------------------------------------------------------------

def compiled_prefill(name, cfg, params, arrays, keys, sched):
  """(the compiled whole prefill as a no-argument callable, compile seconds)."""
  t0 = time.perf_counter()
  exe = bench_families.whole_prefill.lower(name, cfg, params, arrays, keys, sched).compile()
  secs = time.perf_counter() - t0
  return (lambda: exe(params, arrays, keys).block_until_ready()), secs


def decode_rate(cfg, params, inputs: dict, n: int) -> float:
  """Decoded tokens per second per sequence batch: (t(1 + n) - t(1)) / n per step."""
  cfg = with_text(cfg, eos_token_ids=())
  run = lambda k: generation.generate(cfg, params, max_new_tokens=k, **inputs)
  run(1), run(1 + n)                                            # compile both
  t = {}
  for k in (1, 1 + n):
    t0 = time.perf_counter()
    run(k)
    t[k] = time.perf_counter() - t0
  return inputs["input_ids"].shape[0] * n / max(t[1 + n] - t[1], 1e-9)


def budget_schedules(budgets, n_visual: int, num_layers: int) -> dict:
  """{"budget of 576": resolved entropy@2 schedule at that share of the model's visual tokens}."""
  out = {}
  for b in budgets:
    target = b * n_visual / REFERENCE_VISUAL
    out[str(b)] = schedule_lib.from_budget("entropy", min(2, num_layers - 1), target, n_visual,
                                      num_layers)
  return out


def torch_prefills(cfg, inputs: dict, dtype: str) -> dict:
  """{"torch_sdpa" (and "torch_flash2"): callable} of transformers' LLaVA prefill, random init."""
  import torch
  from transformers import LlavaForConditionalGeneration
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = getattr(torch, dtype)
  with torch.device(device):
    model = LlavaForConditionalGeneration(bench_prefill.hf_config(cfg)).to(tdt).eval()
  ids = torch.as_tensor(inputs["input_ids"], device=device)
  px = torch.as_tensor(inputs["pixel_values"], device=device).to(tdt)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  import importlib.util
  attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
  out = {}
  for a in attns:
    fn = bench_prefill.torch_prefill(model, ids, px, a)
    out["torch_" + ("sdpa" if a == "sdpa" else "flash2")] = lambda fn=fn: (fn(), sync())
  return out


# ---- one model ----------------------------------------------------------------------------------

def bench_model(key: str, attention: str, args) -> dict:
  name, cfg = model_config(key, args.scale, args.dtype, attention)
  params = random_params(name, cfg, args.dtype)
  inputs = prompt(name, cfg, args.scale)
  prepared = core.prepare(name, cfg, inputs)
  n_vis, n_text = int(prepared.visual_B[0]), int(prepared.text_B[0])
  patches = n_vis * (1 if name == "llava" else cfg.vision.merge_unit)
  n_l = cfg.text.num_layers
  keys = inputs_lib.example_keys(0, 1)
  scheds = {"unpruned": ()} | budget_schedules(args.budgets, n_vis, n_l)
  fns, compile_s = {}, {}
  for label, s in scheds.items():
    fns[label], compile_s[label] = compiled_prefill(name, cfg, params, prepared.arrays, keys, s)
  if args.torch and name == "llava":
    fns |= torch_prefills(cfg, inputs, args.dtype)
  times = dict(zip(fns, map(statistics.median, prune_bench.interleaved(list(fns.values()),
                                                                         args.runs))))
  peak, peak_from = peak_flops(args.peak_tflops)
  fl = analytic_flops(name, cfg, params, n_text, n_vis, patches)
  base = times["unpruned"]
  rows = {"model": key, "family": name, "attention": attention, "dtype": args.dtype,
          "visual_tokens": n_vis, "text_tokens": n_text, "layers": n_l,
          "compile_s": compile_s["unpruned"], "prefill_ms": 1e3 * base,
          "flops": fl, "mfu": fl / base / peak, "peak_from": peak_from,
          "budgets": {b: {"schedule": prune_bench.sched_text(s),
                               "speedup": base / times[b], "compile_s": compile_s[b],
                               "flops_ratio": analytic_flops(name, cfg, params, n_text, n_vis,
                                                             patches, s) / fl,
                               "kv_bytes": kv_bytes(cfg, s, n_text, n_vis, args.decode_tokens,
                                                    args.dtype)}
                      for b, s in scheds.items() if b != "unpruned"},
          "kv_bytes": kv_bytes(cfg, (), n_text, n_vis, args.decode_tokens, args.dtype),
          "decode_tokens_per_s": {str(b): decode_rate(cfg, params, batched(name, inputs, b),
                                                      args.decode_tokens)
                                  for b in args.decode_batches},
          "torch_prefill_ms": {k: 1e3 * v for k, v in times.items() if k.startswith("torch")}}
  return rows


def markdown(rows: list[dict]) -> str:
  head = ("| model | attention | prefill ms | MFU % | compile s | speed-up at "
          + " / ".join(rows[0]["budgets"]) + " | decode tok/s (batch "
          + " / ".join(rows[0]["decode_tokens_per_s"]) + ") | KV MiB | torch prefill ms |\n"
          + "| --- " * 9 + "|")
  lines = []
  for r in rows:
    sp = " / ".join(f"{b['speedup']:.2f}x" for b in r["budgets"].values())
    dec = " / ".join(f"{v:.0f}" for v in r["decode_tokens_per_s"].values())
    torch_ms = ", ".join(f"{k[6:]} {v:.1f}" for k, v in r["torch_prefill_ms"].items()) or "-"
    lines.append(f"| {r['model']} | {r['attention']} | {r['prefill_ms']:.1f} | "
                 f"{100 * r['mfu']:.1f} | {r['compile_s']:.1f} | {sp} | {dec} | "
                 f"{r['kv_bytes'] / 2 ** 20:.1f} | {torch_ms} |")
  return "\n".join([head] + lines)


def run(args) -> int:
  if args.runs < 1 or args.decode_tokens < 1:
    raise InputError("--runs and --decode-tokens must be >= 1")
  for a in args.attention:
    attention_lib.check_implementation(a)
  rows = [bench_model(k, a, args) for k in args.models for a in args.attention]
  print(markdown(rows))
  res = {"rows": rows, "device": str(jax.devices()[0]), "backend": jax.default_backend(),
         "machine": platform.machine(), "scale": args.scale, "runs": args.runs}
  checkpoint.write_json(Path(args.out), res)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
