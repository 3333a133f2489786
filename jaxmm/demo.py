"""`make demo`: the visual-token pruning benchmark on a trained digits-VQA LLaVA.

  python -m jaxmm.demo [--preset default] [--images 200] [--batch-size 50] [--runs 7]
                       [--cache DIR] [--results DIR] [--model FOLDER]

Trains the preset's model (`jaxmm.train.vlm.ensure_model`) unless it is cached under the cache folder
(--cache, else env JAXMM_CACHE, else cache/ at the repo root), writes the digits-VQA test split
there once (one cell, count and presence question per image), loads the model once and answers
the split unpruned and under 15 schedules: each method at keep budgets p = 33/22/11% of the
visual tokens (48/32/16 of 144, the analogue of LLaVA-1.5's 192/128/64 of 576):

  entropy@K, fastv@K     keep p% before layer K = min(2, L-1): the spec's K = 2 (pruning.md §3.2,
                         §6), clamped for shallow test models
  random@K               the same layer and keep, positions `preserve` like the two above: the
                         selection-free control of entropy and fastv (one draw, seed 0)
  divprune@0             keep p% at the LLM input (§5)
  divprune@0,random@L_r  the hybrid of §4.2 / §10.6 with the *layer-averaged* visual tokens as
                         close as possible to p% of them (`mix_stages`); positions `compact`

Per schedule: exact-match accuracy per category and overall, retention (% of the unpruned
overall accuracy), the prefill FLOPs reduction (`jaxmm.flops`, convention B, decoder layers
only) and the prefill latency ratio to unpruned (`jaxmm.eval.prune_bench.prefill_times`: one fixed
batch, runs of all schedules interleaved, medians). Prints the table and the wall time; writes
(atomically) RESULTS/demo.json and RESULTS/demo_accuracy_vs_flops.png.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import jaxmm
import jaxmm.cli
from jaxmm.eval import prune_bench
from jaxmm.eval import vqa as eval_vqa
from jaxmm import checkpoint, flops
from jaxmm.data import digits_vqa, prompts, vqa
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.train import vlm

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (33, 22, 11)          # keep, % of the visual tokens
SCORED_LAYER = 2                # EntropyPrune's and FastV's K (pruning.md §3.2, §6)
MIX_LATE = 0.625                # the random stage of the mix at round(0.625 L) (§10.6)
MIX_RATIO = 0.13                # ... keeping about 0.13 of the DivPrune stage's tokens
CONVENTION = "B"
CATEGORIES = ("cell", "count", "presence")
METHODS = ("entropy", "fastv", "random", "divprune", "divprune+random")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", choices=sorted(vlm.PRESETS), default="default",
                 help="jaxmm.train.vlm preset of the model (trained once, then cached)")
  p.add_argument("--images", type=int, default=200, help="test images (3 questions each)")
  p.add_argument("--batch-size", type=int, default=50, help="eval and latency batch size")
  p.add_argument("--max-new-tokens", type=int, default=2, help="answers are one word + </s>")
  p.add_argument("--runs", type=int, default=7, help="interleaved prefill timing runs")
  p.add_argument("--cache", default=os.environ.get("JAXMM_CACHE", ROOT / "cache"),
                 help="model and test-split cache (default $JAXMM_CACHE or cache/)")
  p.add_argument("--results", default=ROOT / "results", help="where the JSON and PNG go")
  p.add_argument("--model", help="evaluate this model folder instead of the preset's")


# ---- configurations -----------------------------------------------------------------------------

def _round(x: float) -> int:
  return math.floor(x + 0.5)


def mix_stages(target: int, n_visual: int, num_layers: int) -> tuple[int, int, int]:
  """(L_r, k1, k2) of `divprune@0:k1,random@L_r:k2` averaging about `target` visual tokens.

  L_r = round(0.625 L) (kept in [1, L-1]); k2 = round(0.13 k1), at least 1 (pruning.md §10.6);
  k1 in 1..n_visual minimises |(L_r k1 + (L - L_r) k2) / L - target|, ties to the smaller k1.
  """
  L = num_layers
  late = min(max(_round(MIX_LATE * L), 1), L - 1)
  second = lambda k1: min(k1, max(1, _round(MIX_RATIO * k1)))
  average = lambda k1: (late * k1 + (L - late) * second(k1)) / L
  k1 = min(range(1, n_visual + 1), key=lambda k: (abs(average(k) - target), k))
  return late, k1, second(k1)


def schedule_text(method: str, pct: int, n_visual: int, num_layers: int) -> str:
  """The schedule of one (method, keep %) cell of the table, in the text form."""
  scored = min(SCORED_LAYER, num_layers - 1)
  if method == "divprune+random":
    late, k1, k2 = mix_stages(schedule_lib.keep_count(f"{pct}%", n_visual), n_visual, num_layers)
    return f"divprune@0:{k1},random@{late}:{k2}"
  return f"{method}@{0 if method == 'divprune' else scored}:{pct}%"


def configurations(n_visual: int, num_layers: int) -> list[dict]:
  """[{method, budget_pct, schedule}]: unpruned (schedule ()), then every method x budget.

  Schedules are resolved (integer keeps); single-stage random uses positions `preserve`, like
  the entropy and fastv stages it is the control of; the mix keeps each method's default.
  """
  out = [{"method": "unpruned", "budget_pct": 100, "schedule": ()}]
  for method in METHODS:
    for pct in BUDGETS:
      text = schedule_text(method, pct, n_visual, num_layers)
      parsed = schedule_lib.parse(text, positions="preserve" if method == "random" else None)
      out.append({"method": method, "budget_pct": pct,
                  "schedule": schedule_lib.resolve(parsed, n_visual, num_layers)})
  return out


# ---- data and model -----------------------------------------------------------------------------

def eval_split(cache: Path, tc, n_images: int) -> dict:
  """{"questions", "answers", "images"} of the digits-VQA test split, written once under `cache`."""
  tag = json.dumps({**dataclasses.asdict(tc.data), "n": n_images}, sort_keys=True)
  folder = Path(cache) / f"digits-vqa-test-{hashlib.sha1(tag.encode()).hexdigest()[:10]}"
  paths = {"questions": folder / "questions.jsonl", "answers": folder / "answers.jsonl",
           "images": folder / "images"}
  if all(p.exists() for p in paths.values()):   # write_split is atomic: all or nothing
    return paths
  return digits_vqa.write_split(tc.data, folder, "test", n_images=n_images, seed=0)


def model_folder(args) -> Path:
  """`--model` (a model trained on the preset's data), or the preset's model under the cache,
  trained when missing."""
  if args.model:
    return Path(args.model)
  return vlm.ensure_model(Path(args.cache), vlm.PRESETS[args.preset]())


def timing_batch(m, split: dict, batch: int) -> dict:
  """The first `batch` test questions as one batch of model inputs (`jaxmm.data.prompts`), padded
  as `jaxmm.eval.vqa` pads the first batch it evaluates (its longest prompt, rounded up to a
  multiple of 8)."""
  rows = vqa.read_questions(split["questions"])
  pr = prompts.Prompter(m.path)
  chosen = rows[:batch]
  images = [eval_vqa.load_image(split["images"] / r["image"])[0] for r in chosen]
  return pr.inputs(images, [pr.text(r["text"]) for r in chosen])


# ---- measurements -------------------------------------------------------------------------------

def evaluate_all(m, split: dict, confs: list[dict], batch: int, max_new_tokens: int) -> list[dict]:
  """jaxmm.eval.vqa.evaluate of every configuration (one fixed batch shape); prints a line each."""
  out = []
  for c in confs:
    res = eval_vqa.evaluate(m, split["questions"], split["images"], split["answers"],
                            schedule=c["schedule"], batch_size=batch, progress=False,
                            max_new_tokens=max_new_tokens)
    print(f"  {prune_bench.sched_text(c['schedule']):<28} overall {100 * res['overall']:6.2f}%"
          f"  ({res['timing']['total_s']:.1f} s)", flush=True)
    out.append(res)
  return out


def latencies(m, split: dict, confs: list[dict], batch: int, runs: int) -> tuple[list, int]:
  """(median prefill time (s) per configuration, each timed prompt's own text tokens n_text_B).

  Prefill = the decoder layers with the schedule's scoring and gathers, and the LM head at
  the last position (`jaxmm.eval.prune_bench.decoder_prefill`), on the first `batch` questions.
  """
  state, key, prepared = prune_bench.prefill_inputs(m, timing_batch(m, split, batch))
  times = prune_bench.prefill_times(m, state, key, [c["schedule"] for c in confs], runs)
  return [statistics.median(t) for t in times], prepared.text_B


def _pct(x):
  return None if x is None or math.isnan(x) else 100 * x


def table_row(c: dict, res: dict, t: float, base: dict) -> dict:
  """One JSON row (accuracies, retention and FLOPs reduction in %). `base`: the unpruned
  "overall" accuracy and prefill "time", and "n_text" (per timed prompt), "n_visual", "dims"
  for the FLOPs, counted per prompt from its own text length and averaged."""
  s, acc = c["schedule"], res["overall"]
  retention = 100.0 if not s else (100 * acc / base["overall"] if base["overall"] else None)
  n_vis = [base["n_visual"]] * len(base["n_text"])
  red = flops.batch_reduction(s, base["n_text"], n_vis, base["dims"], CONVENTION)
  avg = schedule_lib.average_visual(s, base["dims"].num_layers) if s else base["n_visual"]
  return {"method": c["method"], "budget_pct": c["budget_pct"],
          "schedule": prune_bench.sched_text(s), "average_visual": avg,
          "stages": [{"method": st.method, "layer": st.layer, "keep": st.keep,
                      "positions": st.positions} for st in s],
          "accuracy_pct": {k: _pct(res["per_category"].get(k)) for k in CATEGORIES},
          "overall_pct": _pct(acc), "retention_pct": retention, "flops_reduction_pct": 100 * red,
          "latency_median_s": t, "latency_ratio": t / base["time"],
          "eval_s": res["timing"]["total_s"]}


def benchmark(m, split: dict, batch: int, args) -> dict:
  """Every configuration's row, plus what they share (n_text, convention, timings)."""
  n_vis, dims = m.config.num_image_tokens, flops.Dims.from_config(m.config)
  confs = configurations(n_vis, dims.num_layers)
  t0 = time.perf_counter()
  results = evaluate_all(m, split, confs, batch, args.max_new_tokens)
  t1 = time.perf_counter()
  times, n_text = latencies(m, split, confs, batch, args.runs)
  base = {"overall": results[0]["overall"], "time": times[0], "n_text": n_text,
          "n_visual": n_vis, "dims": dims}
  return {"rows": [table_row(*x, base) for x in zip(confs, results, times)],
          "questions": results[0]["questions"], "visual_tokens": n_vis,
          "num_layers": dims.num_layers, "n_text": float(np.mean(n_text)),
          "n_text_per_prompt": n_text.tolist(), "flops_convention": CONVENTION,
          "batch_size": batch, "max_new_tokens": args.max_new_tokens,
          "latency_runs": args.runs, "eval_s": t1 - t0, "latency_s": time.perf_counter() - t1}


# ---- output -------------------------------------------------------------------------------------

def _cell(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def print_table(res: dict) -> None:
  print(f"\n{res['questions']} questions, {res['visual_tokens']} visual tokens, "
        f"{res['num_layers']} decoder layers; FLOPs convention {res['flops_convention']} "
        f"per prompt from its own text (n_text {min(res['n_text_per_prompt'])}-"
        f"{max(res['n_text_per_prompt'])}), "
        f"averaged; latency: batch {res['batch_size']}, median of "
        f"{res['latency_runs']} interleaved runs")
  print(f"{'method':<16}{'keep %':>7}{'schedule':>30}{'avg vis':>8}{'cell':>7}{'count':>7}"
        f"{'pres.':>7}{'overall':>8}{'retain %':>9}{'FLOPs -%':>9}{'time x':>7}")
  for r in res["rows"]:
    a = r["accuracy_pct"]
    print(f"{r['method']:<16}{r['budget_pct']:>7}{r['schedule']:>30}{r['average_visual']:>8.1f}"
          + "".join(f"{_cell(a[k], '.1f'):>7}" for k in CATEGORIES)
          + f"{_cell(r['overall_pct'], '.1f'):>8}{_cell(r['retention_pct'], '.1f'):>9}"
          f"{r['flops_reduction_pct']:>9.1f}{r['latency_ratio']:>7.2f}")


def plot(res: dict, path: Path) -> Path:
  """Overall accuracy vs FLOPs reduction, one line per method, the unpruned level dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = res["rows"]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  base = rows[0]["overall_pct"] or 0.0
  ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"unpruned ({base:.1f}%)")
  ax.plot([0], [base], "ko")
  for method, marker in zip(METHODS, "o^vsD"):   # entropy, fastv, random share their x
    pts = sorted((r["flops_reduction_pct"], r["overall_pct"] or 0.0)
                 for r in rows if r["method"] == method)
    ax.plot(*zip(*pts), marker=marker, label=method, alpha=0.85)
  ax.set_xlim(-3, 100)
  ax.set_xlabel(f"prefill FLOPs reduction (%, convention {res['flops_convention']})")
  ax.set_ylabel("overall accuracy (%)")
  ax.set_title(f"digits-VQA, {res['questions']} questions, keep {'/'.join(map(str, BUDGETS))}%")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  checkpoint.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)
  return Path(path)


def run(args) -> int:
  t0 = time.perf_counter()
  if not args.model:
    print(f"model: the {args.preset!r} preset of jaxmm.train.vlm, trained once into {args.cache}",
          flush=True)
  folder = model_folder(args)
  t_model = time.perf_counter() - t0
  split = eval_split(Path(args.cache), vlm.PRESETS[args.preset](), args.images)
  m = jaxmm.load(folder)
  batch = min(args.batch_size, 3 * args.images)   # one question per category per image
  print(f"model {folder}\ntest split {split['questions']}", flush=True)
  res = {"model": str(folder), "preset": None if args.model else args.preset,
         **benchmark(m, split, batch, args), "jax_backend": jax.default_backend(),
         "machine": platform.machine(), "cpus": os.cpu_count()}
  print_table(res)
  res["wall_s"] = {"total": time.perf_counter() - t0, "model": t_model}
  out = Path(args.results)
  checkpoint.write_json(out / "demo.json", res)
  print(f"wrote {out / 'demo.json'} and {plot(res, out / 'demo_accuracy_vs_flops.png')}")
  print(f"total wall time {time.perf_counter() - t0:.1f} s (model {t_model:.1f} s, "
        f"eval {res['eval_s']:.1f} s, latency {res['latency_s']:.1f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
