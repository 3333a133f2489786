"""Visual-token pruning benchmark: FLOPs, prefill latency, scoring overhead and logit change.

  jaxmm prune-bench --model OUT --prompts FILE --schedules entropy@2:98 fastv@2:50% ...
      [--budget 64 --method entropy --layer 2] [--runs 7] [--convention B] [--out JSON]
      [--show-kept IMAGE --show-out PNG]
  jaxmm prune-bench --random-config llava_bench --schedules ...   (random weights, synthetic prompts)

--model is any vision-language folder (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL). --prompts FILE
is JSON Lines, one prompt per line: {"image": "path/to/img.png", "text": "question"} (relative
image paths are relative to FILE). The prompts go through the model's own chat template and
processor (`jaxmm.data.prompts`) and are left padded into one batch; its arrays go whole to the
model. Each prompt's visual and text tokens are counted by the model's family (an image's own
count: LLaVA-NeXT's anyres block, Qwen2-VL's merged grid). Per schedule, against the unpruned
model in the same process:
  - analytic prefill FLOPs of the decoder layers (jaxmm.flops, --convention) and the reduction,
    per prompt from its own text and visual counts (not the padded batch's), averaged over the
    prompts;
  - median prefill latency (decoder layers + LM head at the last position, jitted, runs of all
    schedules interleaved so that drift hits all alike) and its ratio to unpruned;
  - scoring overhead: the schedule's score functions alone, jitted, on the layer-(K-1) quantities
    captured for these prompts, as a % of the unpruned prefill;
  - the max |logit change| at the last position versus unpruned (`jaxmm.forward`).
It also times the EntropyPrune eigen step on the dual (H x H) vs the primal (d_h x d_h) Gram
(the model's shape; with --eigen-7b also LLaVA-1.5-7B's).
Prints a table; writes JSON (default results/prune_bench.json).
"""
import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmm.cli
from jaxmm import api, checkpoint, flops, registry, sharding
from jaxmm import inputs as inputs_lib
from jaxmm.data import prompts as prompts_lib
from jaxmm.errors import InputError
from jaxmm.eval.vqa import require_images
from jaxmm.models import core, segments
from jaxmm.pruning import entropy, schedule as schedule_lib, select


def add_args(p: argparse.ArgumentParser) -> None:
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--model", help="a vision-language model folder written by `jaxmm convert`")
  src.add_argument("--random-config", help="a jaxmm.config preset (e.g. llava_bench) with random "
                   "weights and synthetic prompts, for timing")
  p.add_argument("--prompts", help="JSONL file of {\"image\": path, \"text\": question} (with --model)")
  p.add_argument("--schedules", nargs="*", default=[], help="schedules such as entropy@2:98")
  p.add_argument("--budget", type=float, help="average visual-token budget (pruning.md §3.2); "
                 "needs prompts with one visual-token count")
  p.add_argument("--method", default="entropy", help="method for --budget")
  sharding.add_args(p)
  p.add_argument("--layer", type=int, help="pruning layer K for --budget (default: "
                 "EntropyPrune's for the model, 1 on Qwen2.5-VL, else 2)")
  p.add_argument("--runs", type=int, default=7, help="timed runs per schedule (>= 5)")
  p.add_argument("--convention", default="B", choices=["A", "B", "gqa"], help="FLOPs convention")
  p.add_argument("--batch", type=int, default=1, help="synthetic batch size (--random-config)")
  p.add_argument("--text-tokens", type=int, default=40, help="synthetic text tokens (--random-config)")
  p.add_argument("--seed", type=int, default=0, help="drives random pruning")
  p.add_argument("--eigen-7b", action="store_true", help="also time the eigen step at the "
                 "LLaVA-1.5-7B shape (576 tokens, H=32, d_h=128; the primal takes minutes on CPU)")
  p.add_argument("--out", default="results/prune_bench.json")
  p.add_argument("--show-kept", metavar="IMAGE", help="draw each schedule's kept patches over IMAGE")
  p.add_argument("--show-out", metavar="PNG", default="results/prune_kept.png")


# ---- inputs -------------------------------------------------------------------------------------

def read_prompts(path) -> list[dict]:
  """[{"image": Path, "text": str}] from a JSONL file; relative image paths are relative to it."""
  path = Path(path)
  if not path.is_file():
    raise InputError(f"prompts file {path} does not exist")
  out = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      out.append({"image": path.parent / rec["image"], "text": str(rec["text"])})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise InputError(f"{path}:{i}: expected {{\"image\": path, \"text\": question}}: {e}") from None
  if not out:
    raise InputError(f"prompts file {path} holds no prompts")
  return out


def model_inputs(m, prompts) -> dict:
  """One batch of the prompts through the model's chat template and processor, left padded to
  the longest: NumPy arrays named as transformers names them."""
  from jaxmm.eval.vqa import load_image
  pr = prompts_lib.Prompter(m.path)
  images = []
  for p in prompts:
    img, err = load_image(p["image"])
    if err:
      raise InputError(err)
    images.append(img)
  return pr.inputs(images, [pr.text(p["text"]) for p in prompts], multiple=1)


def random_model(name: str, batch: int, n_text: int, seed: int = 0):
  """(Model with random weights, inputs {input_ids, attention_mask, pixel_values}):
  [5 text][image][n_text - 5 text]."""
  from jaxmm.eval.bench_prefill import build
  if name != "llava_bench":   # bench_prefill builds (and converts) exactly this preset
    raise InputError(f"--random-config supports llava_bench, got {name!r}")
  _, cfg, params = build(seed)
  rng = np.random.default_rng(seed)
  img = np.full((batch, cfg.num_image_tokens), cfg.image_token_id)
  ids = np.concatenate([rng.integers(3, 32000, (batch, 5)), img,
                        rng.integers(3, 32000, (batch, n_text - 5))], axis=1).astype(np.int32)
  px = rng.standard_normal((batch, 3, cfg.vision.image_size, cfg.vision.image_size))
  return api.Model("llava", cfg, jax.device_put(params)), {
      "input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": px.astype(np.float32)}


# ---- measurements -------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("dec", "sched"))
def decoder_prefill(dec, dp, state, key, sched):
  """Last-position logits f32[B, V] after the decoder layers under `sched` (the one prefill
  path, `segments.prefill`, from the TokenState entering the decoder)."""
  pre = segments.prefill(dec, dp, state, sched, key)
  return dec.logits(dp, pre.segments[-1].state.hidden[:, -1:])[:, 0]


def median_time(fn, runs: int) -> float:
  fn()  # compile / warm up
  out = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def scoring_time(dec, dp, state, sched, key, runs: int) -> float:
  """Σ over stages of the median time of the stage's score function alone (jitted), on the
  layer-(K-1) quantities of the prefill path's own segments (`segments.run_range`)."""
  total, start = 0.0, 0
  score_fn = jax.jit(select.scores, static_argnums=0)
  run_range = jax.jit(segments.run_range, static_argnums=(0, 3, 4, 5))
  for i, stage in enumerate(sched):
    needs = schedule_lib.needs((stage,))
    if stage.layer > start:
      seg, out = run_range(dec, dp, state, start, stage.layer, needs)
      state, aux = seg.state, out.last
    else:
      aux = {}
    k = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(key)
    total += median_time(lambda: score_fn(stage, state, aux, k), runs)
    state = select.apply_stage(stage, state, aux, k)
    start = stage.layer
  return total


def eigen_step_times(num_heads: int, head_dim: int, n_tokens: int, runs: int) -> dict:
  """Median time of eigvalsh on n_tokens dual (H x H) vs primal (d_h x d_h) Grams."""
  q = jax.random.normal(jax.random.key(0), (n_tokens, num_heads, head_dim))
  dual = jax.vmap(entropy.gram_dual)(q)
  primal = jax.vmap(entropy.gram_primal)(q)
  eig = jax.jit(jnp.linalg.eigvalsh)
  t_dual, t_primal = median_time(lambda: eig(dual), runs), median_time(lambda: eig(primal), runs)
  return {"num_heads": num_heads, "head_dim": head_dim, "tokens": n_tokens, "dual_s": t_dual,
          "primal_s": t_primal, "speedup": t_primal / t_dual,
          "theory": (head_dim / num_heads) ** 3}


# ---- the benchmark ------------------------------------------------------------------------------

def schedules_from_args(args, m, prepared) -> list:
  """The schedules of --schedules and --budget, resolved for the batch (`core.resolve`: each
  prompt's own visual count on the batch's padded capacity)."""
  out = [core.resolve(m.family, m.config, prepared, schedule_lib.parse(s)) for s in args.schedules]
  if args.budget is not None:
    counts = sorted(set(prepared.visual_B.tolist()))
    if len(counts) != 1:
      raise InputError(f"--budget averages one visual-token count over the layers, but the "
                       f"prompts hold {counts}: give --schedules instead")
    layer = args.layer if args.layer is not None else schedule_lib.entropy_layer(
        getattr(m.config, "model_type", m.family))
    stage = schedule_lib.from_budget(args.method, layer, args.budget, counts[0],
                                     m.config.text.num_layers)
    out.append(core.resolve(m.family, m.config, prepared, stage))
  if not out:
    raise InputError("no schedule: give --schedules and/or --budget")
  return out


def mean_average_visual(sched, n_visual_B, num_layers: int) -> float:
  """The layer-averaged visual-token count (`schedule.average_visual`) of each prompt under
  `sched` (as it runs in the batch: `schedule.for_example`), averaged over the prompts."""
  per = [schedule_lib.average_visual(schedule_lib.for_example(sched, int(n), num_layers),
                                     num_layers) if sched and n else float(n)
         for n in n_visual_B]
  return float(np.mean(per))


def sched_text(sched, percent: bool = False) -> str:
  """The text form of a resolved schedule: its keep counts at the batch's visual capacity or,
  with `percent`, a percentage keep as given (each prompt applies it to its own count)."""
  return ",".join(f"{s.method}@{s.layer}:{(percent and s.percent) or s.keep}"
                  for s in sched) or "unpruned"


def prefill_inputs(m, inputs: dict, seed: int = 0):
  """(TokenState entering the decoder, per-example random keys, the family's `Prepared`) for
  one left-padded batch: `inputs` as the model's processor names them (`jaxmm.forward`'s)."""
  prepared = core.prepare(m.family, m.config, inputs)
  state = registry.family_module(m.family).token_state(m.config, m.params, prepared.arrays)
  keys = inputs_lib.example_keys(seed, prepared.arrays["input_ids"].shape[0])
  return state, keys, prepared


def prefill_times(m, state, key, scheds, runs: int) -> list[list[float]]:
  """Per schedule, `runs` wall times (s) of `decoder_prefill` on the same batch.

  Every schedule is compiled first; then the runs of all schedules are interleaved, so that
  drift (other load, clock changes) hits all of them alike. `()` is the unpruned prefill.
  """
  dec, dp = core.decoder_of(m.family, m.config, m.params)
  return interleaved([functools.partial(decoder_prefill, dec, dp, state, key, s) for s in scheds],
                     runs)


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
  """This machine's f32 matmul rate (GFLOP/s): a jitted n x n GEMM, measured here."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  t = statistics.median(interleaved([lambda: f(a)], runs)[0])
  return 2 * n ** 3 / t / 1e9


def interleaved(fns, runs: int) -> list[list[float]]:
  """`runs` wall times (s) of each function: all are compiled first, then run in turn."""
  for f in fns:
    jax.block_until_ready(f())   # compile
  times = [[] for _ in fns]
  for _ in range(runs):
    for i, f in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[i].append(time.perf_counter() - t0)
  return times


def measure(m, inputs: dict, scheds, args) -> dict:
  """FLOPs, latency, scoring time and logit change of each resolved schedule (and unpruned) on
  one batch (`inputs`: the processor's arrays), FLOPs per prompt from its own counts."""
  cfg, num_layers = m.config, m.config.text.num_layers
  state, key, prepared = prefill_inputs(m, inputs, args.seed)
  vis_B, text_B = prepared.visual_B, prepared.text_B   # each prompt's own, not the padded batch's
  all_scheds = [()] + scheds
  times = prefill_times(m, state, key, all_scheds, args.runs)
  base_logits = np.asarray(api.forward(m, **inputs).logits[:, -1])
  dims = flops.Dims.from_config(cfg)
  full_flops = np.mean(flops.batch_flops((), text_B, vis_B, dims, args.convention))
  base_t = statistics.median(times[0])
  batch, seq_len = prepared.arrays["input_ids"].shape
  rows = []
  for s, t in zip(all_scheds, times):
    row = {"schedule": sched_text(s, percent=True), "stages": [
        {"method": st.method, "layer": st.layer, "keep": st.keep, "percent": st.percent,
         "positions": st.positions} for st in s],
        "average_visual": mean_average_visual(s, vis_B, num_layers)}
    f = np.mean(flops.batch_flops(s, text_B, vis_B, dims, args.convention))
    row.update(flops=float(f) * batch, flops_ratio=float(f / full_flops),
               flops_reduction=float(1 - f / full_flops),
               latency_median_s=statistics.median(t), latency_ratio=statistics.median(t) / base_t,
               latency_s=t)
    if s:
      row["scoring_s"] = scoring_time(*core.decoder_of(m.family, cfg, m.params), state, s, key,
                                      args.runs)
      row["scoring_pct_of_prefill"] = 100 * row["scoring_s"] / base_t
      out = api.forward(m, schedule=s, seed=args.seed, **inputs)
      row["max_logit_change"] = float(np.abs(np.asarray(out.logits[:, -1]) - base_logits).max())
    rows.append(row)
  return {"batch": int(batch), "seq_len": int(seq_len), "visual_tokens": vis_B.tolist(),
          "n_text_counted": text_B.tolist(), "convention": args.convention, "runs": args.runs,
          "schedules": rows}


def print_table(res: dict) -> None:
  print(f"batch {res['batch']}, {res['seq_len']} tokens (visual per prompt: "
        f"{res['visual_tokens']}), FLOPs convention {res['convention']}, median of "
        f"{res['runs']} interleaved runs")
  head = f"{'schedule':<28}{'avg vis':>8}{'GFLOPs':>9}{'FLOPs %':>9}{'ms':>9}{'time %':>8}{'score %':>9}{'max dlogit':>12}"
  print(head)
  for r in res["schedules"]:
    print(f"{r['schedule']:<28}{r['average_visual']:>8.1f}{r['flops'] / 1e9:>9.2f}"
          f"{100 * r['flops_ratio']:>9.1f}{1e3 * r['latency_median_s']:>9.2f}"
          f"{100 * r['latency_ratio']:>8.1f}{r.get('scoring_pct_of_prefill', 0):>9.2f}"
          f"{r.get('max_logit_change', 0):>12.3e}")
  for e in res.get("eigen_step", []):
    print(f"eigen step, {e['tokens']} tokens, H={e['num_heads']} d_h={e['head_dim']}: dual "
          f"{1e3 * e['dual_s']:.2f} ms, primal {1e3 * e['primal_s']:.2f} ms, "
          f"{e['speedup']:.1f}x (theory {e['theory']:.0f}x)")


def show_kept(m, image_path, text, scheds, out_png, seed) -> Path:
  """A PNG: per grid of the image's visual tokens (the family's `visual_grids`: one for LLaVA
  and Qwen2-VL, the base and the tile grid for LLaVA-NeXT) a row, with the image and, per
  schedule, the image with the dropped tokens' cells washed out. Each grid is drawn over the
  whole image stretched to it: exact where the grid covers the image (Qwen2-VL, LLaVA-NeXT's
  tile grid), approximate where the processor crops (LLaVA-1.5's centre crop)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from PIL import Image
  from jaxmm.generate_cli import prepare
  inputs, _ = prepare(m.path, text, image_path, m.family)
  grids = registry.family_module(m.family).visual_grids(m.config, inputs)[0]
  with Image.open(image_path) as im:
    img = np.asarray(im.convert("RGB"))
  n_vis = int(core.prepare(m.family, m.config, inputs).visual_B[0])
  kept = [np.asarray(api.forward(m, seed=seed, **inputs, schedule=schedule_lib.for_example(
      s, n_vis, m.config.text.num_layers)).kept[-1][0]) for s in scheds]   # as in a batch
  fig, axes = plt.subplots(len(grids), len(scheds) + 1, squeeze=False,
                           figsize=(3 * (len(scheds) + 1), 3.3 * len(grids)))
  for row, grid in zip(axes, grids):
    rows_, cols = grid.shape
    row[0].imshow(img, extent=(0, cols, rows_, 0))
    row[0].set_title(f"image, {rows_} x {cols} grid", fontsize=8)
    for ax, s, k in zip(row[1:], scheds, kept):
      keep = np.isin(grid, k[k >= 0])
      wash = np.zeros((rows_, cols, 4))
      wash[~keep] = (1.0, 1.0, 1.0, 0.65)              # dropped cells washed out
      ax.imshow(img, extent=(0, cols, rows_, 0))
      ax.imshow(wash, extent=(0, cols, rows_, 0), interpolation="nearest")
      for r, c in zip(*np.nonzero(keep)):
        ax.add_patch(plt.Rectangle((c, r), 1, 1, fill=False, edgecolor="red", linewidth=0.6))
      ax.set_title(f"{sched_text(s, percent=True)}\n{int(keep.sum())} of {keep.size} kept",
                   fontsize=8)
  for ax in axes.reshape(-1):
    ax.axis("off")
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05)
  checkpoint.atomic_file(out_png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)
  return out_png


def run(args) -> int:
  if args.runs < 5:
    raise InputError(f"--runs must be >= 5, got {args.runs}")
  if args.show_kept and not args.model:
    raise InputError("--show-kept needs --model (a processor to read the image)")
  if args.model:
    m = api.load(Path(args.model), mesh=sharding.mesh_from_args(args), sharding=args.sharding)
    require_images(m, "prune-bench")
    if not args.prompts:
      raise InputError("--prompts is required with --model")
    prompts = read_prompts(args.prompts)
    inputs = model_inputs(m, prompts)
  else:
    m, inputs = random_model(args.random_config, args.batch, args.text_tokens, args.seed)
  tc = m.config.text
  scheds = schedules_from_args(args, m, core.prepare(m.family, m.config, inputs))
  with sharding.activate(m.mesh):   # the batch split along `data` on a --mesh
    res = {"model": args.model or f"random:{args.random_config}",
           **measure(m, inputs, scheds, args)}
  res["eigen_step"] = [eigen_step_times(tc.num_heads, tc.head_dim, max(res["visual_tokens"]),
                                        args.runs)]
  if args.eigen_7b:
    res["eigen_step"].append(eigen_step_times(32, 128, 576, args.runs))
  res.update(jax_backend=jax.default_backend(), device=str(jax.devices()[0]),
             machine=platform.machine())
  print_table(res)
  if args.show_kept:
    png = show_kept(m, args.show_kept, prompts[0]["text"], scheds, args.show_out, args.seed)
    print(f"kept patches: {png}")
  out = checkpoint.write_json(args.out, res)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
