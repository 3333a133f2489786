"""`make demo`: the visual-token pruning benchmark on a trained digits-VQA LLaVA.

  python -m jaxmm.demo [--preset robust] [--images 200] [--batch-size 50] [--runs 7]
                       [--cache DIR] [--results DIR] [--model FOLDER]

Trains the preset's model (`jaxmm.train.vlm.ensure_model`) unless it is cached under the cache folder
(--cache, else env JAXMM_CACHE, else cache/ at the repo root), writes the digits-VQA test split
there once (one cell, count and presence question per image), loads the model once and answers
the split unpruned and under 15 schedules: every method at the same three budgets, stated as the
*layer-averaged* visual tokens (1/L) Σ_l N_vis(l) (pruning.md §1): 50 / 42 / 33% of them (72 / 60
/ 48 of 144). Each schedule's keep is solved for the budget (`schedule.from_budget`, or
`schedule.solve_keep` for the two-stage mix): its average is at most the budget and as close to
it as a whole keep allows. In 8 layers a stage at K = 2 averages at least 2·144/8 = 36 tokens, so
LLaVA-1.5's 192/128/64-of-576 analogues (48/32/16) are not all reachable at the reference layer;
48 is the lowest budget every method meets there.

  entropy@K, fastv@K     prune before layer K = min(2, L-1): the spec's K = 2 (pruning.md §3.2,
                         §6), clamped for shallow test models; a budget out of reach at K
                         (a shallow model's) is skipped and listed, not moved to another layer
  random@K               the same layer and keep, positions `preserve` like the two above: the
                         selection-free control of entropy and fastv
  divprune@0             at the LLM input (§5)
  divprune@0,random@L_r  the hybrid of §4.2 / §10.6: random at L_r = round(0.625 L) keeping 13%
                         of the DivPrune tokens; positions `compact`

Schedules with a random stage run once per seed of RANDOM_SEEDS (0, 1, 2); their rows are the
mean ± sample std over those draws (the reference averages 3 random runs). Runs are
deterministic on one machine.

Per schedule: exact-match accuracy per category and overall, retention (% of the unpruned
overall accuracy), the prefill FLOPs reduction (`jaxmm.flops`, convention B, decoder layers
only) and the prefill latency ratio to unpruned (`jaxmm.eval.prune_bench.prefill_times`: one fixed
batch, runs of all schedules interleaved, medians). Prints the table, how far one trained model may sit from
the README's multi-model table (docs/demo_seeds.json, written by eval/demo_seeds.py) and the
wall time; writes (atomically) RESULTS/demo.json and RESULTS/demo_accuracy_vs_flops.png.
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
from jaxmm.errors import InputError
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.train import vlm, vlm_task

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (50, 42, 33)          # layer-averaged visual tokens, % (72 / 60 / 48 of 144)
RANDOM_SEEDS = (0, 1, 2)        # schedules with a random stage: mean ± std over these draws
SCORED_LAYER = 2                # EntropyPrune's and FastV's K (pruning.md §3.2, §6)
MIX_LATE = 0.625                # the random stage of the mix at round(0.625 L) (§10.6)
MIX_RATIO = 0.13                # ... keeping about 0.13 of the DivPrune stage's tokens
CONVENTION = "B"
CATEGORIES = ("cell", "count", "presence")
SEEDS_SUMMARY = ROOT / "docs" / "demo_seeds.json"   # eval/demo_seeds.py's spread, for the note
# The demo model's recipe: the default one trained with blank-token dropping. Over three trained
# models its DivPrune and hybrid rows vary by at most 0.9 points (std), the default's by up to 15
# (README, "The demo over three trained models"); same steps, same training time.
PRESET = "robust"
METHODS = ("entropy", "fastv", "random", "divprune", "divprune+random")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", choices=sorted(vlm.PRESETS), default=PRESET,
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

def budget_tokens(pct: int, n_visual: int) -> int:
  """A budget in % of the visual tokens as a layer-averaged count, rounded half up."""
  return schedule_lib.keep_count(f"{pct}%", n_visual)


def mix_template(num_layers: int) -> str:
  """`divprune@0:?,random@L_r:13%` with L_r = round(0.625 L) in [1, L-1] (pruning.md §10.6)."""
  late = schedule_lib.late_layer(num_layers, MIX_LATE)
  return f"divprune@0:?,random@{late}:{round(100 * MIX_RATIO)}%"


def method_schedule(method: str, avg: int, n_visual: int, num_layers: int):
  """The resolved schedule of one (method, budget) cell: its layer-averaged visual-token count is
  at most `avg` and as close to it as its keep allows (`schedule.from_budget`, or
  `schedule.solve_keep` for the mix). Scored methods and their random control prune before
  layer K = min(2, L-1), divprune at layer 0; InputError when the budget is out of reach there."""
  if method == "divprune+random":
    return schedule_lib.solve_keep(mix_template(num_layers), avg, n_visual, num_layers)
  layer = 0 if method == "divprune" else min(SCORED_LAYER, num_layers - 1)
  positions = "preserve" if method == "random" else None
  sched = schedule_lib.from_budget(method, layer, avg, n_visual, num_layers, positions)
  if sched[0].layer != layer:   # from_budget moved it earlier; the row would not be comparable
    raise InputError(f"{method} cannot average {avg} visual tokens from layer {layer}")
  return sched


def configurations(n_visual: int, num_layers: int) -> tuple[list[dict], list[str]]:
  """([{method, budget_pct, budget, schedule}], [unreachable cells]): unpruned (schedule ()),
  then every method at every layer-averaged budget it can meet with at least one token kept per
  stage (a shallow model's first layers alone may average more than a budget). Single-stage
  random uses positions `preserve`, like the entropy and fastv stages it is the control of; the
  mix keeps each method's default."""
  out = [{"method": "unpruned", "budget_pct": 100, "budget": n_visual, "schedule": ()}]
  unreachable = []
  for method in METHODS:
    for pct in BUDGETS:
      avg = budget_tokens(pct, n_visual)
      try:
        sched = method_schedule(method, avg, n_visual, num_layers)
      except InputError:
        sched = None
      if sched is None or any(st.keep < 1 for st in sched):
        unreachable.append(f"{method} at {avg} of {n_visual} ({num_layers} layers)")
        continue
      out.append({"method": method, "budget_pct": pct, "budget": avg, "schedule": sched})
  return out, unreachable


def is_random(sched) -> bool:
  return any(st.method == "random" for st in sched)


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

def evaluate_all(m, split: dict, confs: list[dict], batch: int, max_new_tokens: int,
                 seeds=RANDOM_SEEDS) -> list[list[dict]]:
  """jaxmm.eval.vqa.evaluate of every configuration (one fixed batch shape), once per seed for
  schedules with a random stage, else once (seed 0); prints a line each."""
  out = []
  for c in confs:
    runs = []
    for seed in (seeds if is_random(c["schedule"]) else seeds[:1]):
      res = eval_vqa.evaluate(m, split["questions"], split["images"], split["answers"],
                              schedule=c["schedule"], batch_size=batch, progress=False,
                              max_new_tokens=max_new_tokens, seed=seed)
      print(f"  {prune_bench.sched_text(c['schedule']):<28} seed {seed}  overall "
            f"{100 * res['overall']:6.2f}%  ({res['timing']['total_s']:.1f} s)", flush=True)
      runs.append(res)
    out.append(runs)
  return out


def latencies(m, split: dict, confs: list[dict], batch: int, runs: int) -> tuple[list, int]:
  """(median prefill time (s) per configuration, each timed prompt's own text tokens n_text_B).

  Prefill = the decoder layers with the schedule's scoring and gathers, and the LM head at
  the last position (`jaxmm.eval.prune_bench.decoder_prefill`), on the first `batch` questions.
  """
  state, key, prepared = prune_bench.prefill_inputs(m, timing_batch(m, split, batch))
  times = prune_bench.prefill_times(m, state, key, [c["schedule"] for c in confs], runs)
  return [statistics.median(t) for t in times], prepared.text_B


def ink_kept(m, split: dict, confs: list[dict], batch: int, max_new_tokens: int) -> list[float]:
  """Per configuration, the % of the ink patches (the visual tokens that show a digit: what an
  answer can need) among the tokens its first stage keeps, on the timing batch; the mean over
  the draws for a random stage, 100 unpruned. Known only on synthetic data: a selection's recall
  of the informative tokens, apart from how the model copes with what is left.

  The batch is the evaluation's first (same padding, example ids and `max_new_tokens`), so the
  generation's compiled programs are reused and its random draws are the evaluation's own."""
  x = timing_batch(m, split, batch)
  ink_BxV = np.asarray(vlm_task.ink_of_pixels(x["pixel_values"], m.config.vision.patch_size))
  first_B = np.argmax(x["input_ids"] == m.config.image_token_id, axis=1)
  out = []
  for c in confs:
    if not c["schedule"]:
      out.append(100.0)
      continue
    pct = []
    for seed in (RANDOM_SEEDS if is_random(c["schedule"]) else RANDOM_SEEDS[:1]):
      _, kept, _ = jaxmm.generate(m, max_new_tokens=max_new_tokens, schedule=c["schedule"],
                                  seed=seed, return_kept=True, **x)
      vis_BxK = kept[0] - first_B[:, None]   # slot -> visual index; -1 padding stays negative
      hit = np.take_along_axis(ink_BxV, np.maximum(vis_BxK, 0), axis=1) & (vis_BxK >= 0)
      pct.append(100 * hit.sum() / max(int(ink_BxV.sum()), 1))
    out.append(statistics.fmean(pct))
  return out


def _pct(x):
  return None if x is None or math.isnan(x) else 100 * x


def mean_std(xs: list) -> tuple:
  """(mean, sample std or None for one value) of the values that are not None."""
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def accuracy_fields(runs: list[dict], base_overall: float | None) -> dict:
  """Accuracies (%) of one configuration: the mean over its seeds, the std when there are
  several (random stages), per seed, and the retention of the mean."""
  cat = {k: mean_std([_pct(r["per_category"].get(k)) for r in runs]) for k in CATEGORIES}
  per_seed = [_pct(r["overall"]) for r in runs]
  overall, std = mean_std(per_seed)
  return {"accuracy_pct": {k: v[0] for k, v in cat.items()},
          "accuracy_std_pct": {k: v[1] for k, v in cat.items()},
          "overall_pct": overall, "overall_std_pct": std, "overall_per_seed_pct": per_seed,
          "seeds": list(RANDOM_SEEDS[:len(runs)]) if len(runs) > 1 else None,
          "retention_pct": (100 * overall / (100 * base_overall)
                            if base_overall and overall is not None else None)}


def table_row(c: dict, runs: list[dict], t: float | None, base: dict) -> dict:
  """One JSON row (accuracies, retention and FLOPs reduction in %). `base`: the unpruned
  "overall" accuracy and prefill "time" (None: not timed), and "n_text" (per timed prompt),
  "n_visual", "dims" for the FLOPs, counted per prompt from its own text length and averaged."""
  s = c["schedule"]
  n_vis = [base["n_visual"]] * len(base["n_text"])
  red = flops.batch_reduction(s, base["n_text"], n_vis, base["dims"], CONVENTION)
  avg = schedule_lib.average_visual(s, base["dims"].num_layers) if s else base["n_visual"]
  acc = accuracy_fields(runs, base["overall"])
  if not s:
    acc["retention_pct"] = 100.0
  return {"method": c["method"], "budget_pct": c["budget_pct"], "budget": c["budget"],
          "schedule": prune_bench.sched_text(s), "average_visual": avg,
          "stages": [{"method": st.method, "layer": st.layer, "keep": st.keep,
                      "positions": st.positions} for st in s],
          **acc, "flops_reduction_pct": 100 * red, "latency_median_s": t,
          "latency_ratio": None if t is None else t / base["time"],
          "eval_s": sum(r["timing"]["total_s"] for r in runs)}


def benchmark(m, split: dict, batch: int, args, timing: bool = True) -> dict:
  """Every configuration's row, plus what they share (n_text, convention, timings). Without
  `timing` the latency columns are None (the FLOPs still count the timing batch's prompts)."""
  n_vis, dims = m.config.num_image_tokens, flops.Dims.from_config(m.config)
  confs, unreachable = configurations(n_vis, dims.num_layers)
  for cell in unreachable:
    print(f"  skipped: {cell}: the budget is below what the method's layer allows", flush=True)
  t0 = time.perf_counter()
  results = evaluate_all(m, split, confs, batch, args.max_new_tokens)
  t1 = time.perf_counter()
  if timing:
    times, n_text = latencies(m, split, confs, batch, args.runs)
  else:
    times = [None] * len(confs)
    n_text = prune_bench.prefill_inputs(m, timing_batch(m, split, batch))[2].text_B
  base = {"overall": results[0][0]["overall"], "time": times[0], "n_text": n_text,
          "n_visual": n_vis, "dims": dims}
  rows = [table_row(*x, base) for x in zip(confs, results, times)]
  t2 = time.perf_counter()
  for r, pct in zip(rows, ink_kept(m, split, confs, batch, args.max_new_tokens)):
    r["ink_kept_pct"] = pct
  return {"rows": rows,
          "questions": results[0][0]["questions"], "visual_tokens": n_vis,
          "num_layers": dims.num_layers, "unreachable": unreachable,
          "n_text": float(np.mean(n_text)),
          "n_text_per_prompt": np.asarray(n_text).tolist(), "flops_convention": CONVENTION,
          "batch_size": batch, "max_new_tokens": args.max_new_tokens,
          "latency_runs": args.runs if timing else 0, "random_seeds": list(RANDOM_SEEDS),
          "eval_s": t1 - t0, "latency_s": t2 - t1, "ink_s": time.perf_counter() - t2}


# ---- output -------------------------------------------------------------------------------------

def _cell(x, fmt: str, std=None) -> str:
  if x is None:
    return "-"
  return format(x, fmt) + ("" if std is None else "±" + format(std, fmt))


def print_table(res: dict) -> None:
  print(f"\n{res['questions']} questions, {res['visual_tokens']} visual tokens, "
        f"{res['num_layers']} decoder layers; budget = the layer-averaged visual tokens; random "
        f"rows: mean±std over seeds {res['random_seeds']}; FLOPs convention "
        f"{res['flops_convention']} per prompt from its own text (n_text "
        f"{min(res['n_text_per_prompt'])}-{max(res['n_text_per_prompt'])}), averaged; latency: "
        f"batch {res['batch_size']}, median of {res['latency_runs']} interleaved runs")
  print(f"{'method':<16}{'budget':>7}{'schedule':>30}{'avg vis':>8}{'cell':>11}{'count':>11}"
        f"{'pres.':>11}{'overall':>11}{'retain %':>9}{'ink %':>7}{'FLOPs -%':>9}{'time x':>7}")
  for r in res["rows"]:
    a, sd = r["accuracy_pct"], r["accuracy_std_pct"]
    print(f"{r['method']:<16}{r['budget']:>7}{r['schedule']:>30}{r['average_visual']:>8.1f}"
          + "".join(f"{_cell(a[k], '.1f', sd[k]):>11}" for k in CATEGORIES)
          + f"{_cell(r['overall_pct'], '.1f', r['overall_std_pct']):>11}"
          f"{_cell(r['retention_pct'], '.1f'):>9}{_cell(r.get('ink_kept_pct'), '.1f'):>7}"
          f"{r['flops_reduction_pct']:>9.1f}"
          f"{_cell(r['latency_ratio'], '.2f'):>7}")


def print_spread_note(preset: str, path: Path = SEEDS_SUMMARY) -> None:
  """How far this one trained model's rows may sit from the README's multi-model table (of
  the same preset; nothing for another one)."""
  if not path.is_file():
    return
  summ = json.loads(path.read_text())
  if summ.get("preset", "default") != preset:
    return
  print(f"This table is one trained model. The README's table is the mean ± std over "
        f"{summ['models']} models of the {preset!r} preset trained with seeds "
        f"{summ['training_seeds']} ({path.relative_to(ROOT)}): unpruned overall std "
        f"{summ['unpruned_std']:.1f} points, "
        f"pruned rows' std {summ['pruned_std_min']:.1f}-{summ['pruned_std_max']:.1f} points "
        f"(median {summ['pruned_std_median']:.1f}), so this model's pruned rows may differ from it "
        f"by that much. The trained weights follow the training seed and XLA's CPU numerics, "
        f"which differ between instruction sets, and this small model's pruned regime is sensitive "
        f"to them.")


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
    pts = sorted((r["flops_reduction_pct"], r["overall_pct"] or 0.0, r["overall_std_pct"] or 0.0)
                 for r in rows if r["method"] == method)
    x, y, err = zip(*pts)
    ax.errorbar(x, y, yerr=err if any(err) else None, marker=marker, label=method, alpha=0.85,
                capsize=3)
  ax.set_xlim(-3, 100)
  ax.set_xlabel(f"prefill FLOPs reduction (%, convention {res['flops_convention']})")
  ax.set_ylabel("overall accuracy (%)")
  budgets = "/".join(str(r["budget"]) for r in rows if r["method"] == METHODS[0])
  ax.set_title(f"digits-VQA, {res['questions']} questions, average {budgets} of "
               f"{res['visual_tokens']} visual tokens", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  checkpoint.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)
  return Path(path)


def run(args) -> int:
  t0 = time.perf_counter()
  if not args.model:   # data-parallel training when the model is not cached (the eval uses one)
    vlm.use_cpu_devices(vlm.PRESETS[args.preset]().batch_size)
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
  if not args.model:
    print_spread_note(args.preset)
  res["wall_s"] = {"total": time.perf_counter() - t0, "model": t_model}
  out = Path(args.results)
  checkpoint.write_json(out / "demo.json", res)
  print(f"wrote {out / 'demo.json'} and {plot(res, out / 'demo_accuracy_vs_flops.png')}")
  print(f"total wall time {time.perf_counter() - t0:.1f} s (model {t_model:.1f} s, "
        f"eval {res['eval_s']:.1f} s, latency {res['latency_s']:.1f} s, ink kept "
        f"{res['ink_s']:.1f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
