"""Calibrated schedules against the reference's fixed ones, on held-out questions, over models.

  python -m jaxmm.eval.calibrate_compare --models M1 M2 M3 --questions Q.jsonl \
      --image-folder DIR --answer-key KEY [--calibration-images 50] [--budgets 64 32 16] \
      [--methods entropy fastv divprune] [--limit N] [--out results/calibrate_compare.json]

The question file is split by image: questions on the first --calibration-images distinct images
calibrate (`jaxmm calibrate`'s measurements: ECL curve and per-category horizons, with the answer
key), the questions on every other image are the held-out evaluation set. Per model and budget
(a layer-averaged visual-token count, or a share such as 25%), it answers the held-out questions
under:
  calibrated <method>   `jaxmm calibrate --method <method> --answer-key`'s schedule (one
                        measurement per model; per budget the candidates picked by calibration
                        accuracy on the calibration questions only)
  calibrated auto       `--method auto`: the most accurate of those on the calibration questions
  fixed <method>@2      the reference's scored stage at K = 2 (`schedule.from_budget`, which
                        moves K earlier when the budget needs it), for entropy and fastv
  fixed divprune+random DivPrune at 0 and random at round(0.625 L) keeping 13% (pruning.md §10.6),
                        the keep solved for the budget
  random@0              random pruning alone, at the LLM input
A configuration out of reach at a budget is listed as such. Schedules with a random stage are
averaged over draw seeds 0, 1, 2. Across models: mean ± sample std of the overall exact-match
accuracy; per budget and method, the calibrated schedule's paired difference to the best fixed
schedule at that budget (mean ± std over the models). Prints a markdown table; writes JSON.
"""
import argparse
import statistics
from pathlib import Path

import jaxmm
import jaxmm.cli
from jaxmm import checkpoint, demo
from jaxmm.data import prompts, vqa
from jaxmm.errors import InputError
from jaxmm.eval import analyze_common as common
from jaxmm.eval import calibrate
from jaxmm.eval import vqa as eval_vqa
from jaxmm.pruning import schedule as schedule_lib

DRAW_SEEDS = (0, 1, 2)
FIXED_LAYER = 2          # the reference scripts' K (pruning.md §3.2, §6)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", nargs="+", required=True, help="jaxmm vision-language model folders")
  p.add_argument("--questions", required=True, help="question JSONL (calibration + held out)")
  p.add_argument("--image-folder", required=True)
  p.add_argument("--answer-key", required=True, help="JSONL of {question_id, answer, category}")
  p.add_argument("--calibration-images", type=int, default=50,
                 help="questions on the first N distinct images calibrate; the rest are held out")
  p.add_argument("--limit", type=int, help="held-out questions used (default: all)")
  p.add_argument("--budgets", nargs="+", default=["64", "32", "16"])
  p.add_argument("--methods", nargs="+", default=list(calibrate.SCORED),
                 choices=calibrate.SCORED)
  p.add_argument("--horizon-limit", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--max-new-tokens", type=int, default=2)
  p.add_argument("--out", default="results/calibrate_compare.json")


def split_by_image(rows: list[dict], n_images: int) -> tuple[list, list]:
  """(calibration rows, held-out rows): the first `n_images` distinct images calibrate."""
  order = list(dict.fromkeys(r["image"] for r in rows))
  if not 0 < n_images < len(order):
    raise InputError(f"--calibration-images {n_images} must be in [1, {len(order) - 1}]: the "
                     f"questions show {len(order)} images and some must be held out")
  cal = set(order[:n_images])
  return [r for r in rows if r["image"] in cal], [r for r in rows if r["image"] not in cal]


def fixed_schedules(method: str, budget: float, n_visual: int, n_l: int) -> dict:
  """{name: resolved schedule or the reason it is out of reach} of the reference's settings."""
  mix = calibrate.template("divprune", 0, schedule_lib.late_layer(n_l))
  makers = {"random@0": lambda: schedule_lib.from_budget("random", 0, budget, n_visual, n_l),
            "fixed divprune+random": lambda: schedule_lib.solve_keep(mix, budget, n_visual, n_l)}
  if method != "divprune":
    makers[f"fixed {method}@{FIXED_LAYER}"] = lambda: schedule_lib.from_budget(
        method, min(FIXED_LAYER, n_l - 1), budget, n_visual, n_l)
  out = {}
  for name, make in makers.items():
    try:
      out[name] = make()
    except InputError as e:
      out[name] = str(e)
  return out


def accuracy(m, rows, image_folder, key, sched, args) -> dict:
  """Overall exact-match accuracy (%) on `rows`, mean over draw seeds when `sched` is random."""
  seeds = DRAW_SEEDS if any(st.method == "random" for st in sched) else DRAW_SEEDS[:1]
  per = []
  for seed in seeds:
    lines, _, _ = eval_vqa.answer_all(m, rows, image_folder, sched, args.batch_size,
                                      args.max_new_tokens, progress=False, seed=seed)
    per.append(100 * eval_vqa.score(lines, rows, key)["overall"])
  return {"overall": statistics.fmean(per), "per_seed": per}


def one_model(folder, cal, held, key, args) -> dict:
  m = jaxmm.load(folder)
  eval_vqa.require_images(m, "calibrate-compare")
  pr = prompts.Prompter(m.path)
  meas = calibrate.measure(m, cal, pr, args.image_folder, key, horizon_limit=args.horizon_limit)
  n_visual, n_l = meas["visual_tokens"], meas["num_layers"]
  results = {}
  for budget in args.budgets:
    target = calibrate.budget_tokens(budget, n_visual)
    confs, found = {}, {}
    for method in args.methods:
      try:
        found[method] = calibrate.search(m, cal, args.image_folder, key, meas, method, budget,
                                         batch_size=args.batch_size)
        confs[f"calibrated {method}"] = schedule_lib.parse(found[method]["schedule"])
      except InputError as e:
        confs[f"calibrated {method}"] = str(e)
      confs.update(fixed_schedules(method, target, n_visual, n_l))
    # --method auto: the methods' winners, the most accurate on the calibration questions
    ranked = sorted(found.values(), key=lambda r: -r["calibration_accuracy"])
    confs["calibrated auto"] = (schedule_lib.parse(ranked[0]["schedule"]) if ranked else
                                "out of reach for every method")
    results[budget] = {}
    for name, sched in confs.items():
      if isinstance(sched, str):
        results[budget][name] = {"schedule": None, "unreachable": sched}
        continue
      sched = schedule_lib.resolve(sched, n_visual, n_l)
      acc = accuracy(m, held, args.image_folder, key, sched, args)
      text = ",".join(f"{st.method}@{st.layer}:{st.keep}" for st in sched)
      results[budget][name] = {"schedule": text, **acc,
                               "average_visual": schedule_lib.average_visual(sched, n_l)}
      print(f"  {common.model_name(folder)} budget {budget}: {name:<24} {text:<30} "
            f"{acc['overall']:6.2f}%", flush=True)
  unpruned = accuracy(m, held, args.image_folder, key, (), args)["overall"]
  return {"model": str(folder), "measurements": meas, "unpruned": unpruned, "results": results}


def aggregate(models: list[dict], budgets, methods) -> dict:
  """{budget: {name: {mean, std, per_model}}, plus per method 'calibrated - best fixed'}."""
  out = {}
  methods = list(methods) + ["auto"]
  for b in budgets:
    names = list(dict.fromkeys(n for mo in models for n in mo["results"][b]))
    rows = {}
    for n in names:
      per = [mo["results"][b].get(n, {}).get("overall") for mo in models]
      mean, std = demo.mean_std(per)
      scheds = sorted({mo["results"][b][n]["schedule"] or "out of reach" for mo in models
                       if n in mo["results"][b]})
      rows[n] = {"mean": mean, "std": std, "per_model": per, "schedules": scheds}
    fixed = {n: r for n, r in rows.items() if not n.startswith("calibrated") and
             r["mean"] is not None and None not in r["per_model"]}
    best = max(fixed, key=lambda n: fixed[n]["mean"]) if fixed else None
    verdicts = {}
    for method in methods:
      cal = rows.get(f"calibrated {method}")
      if best is None or cal is None or None in cal["per_model"]:
        verdicts[method] = {"best_fixed": best, "diff_mean": None, "diff_std": None}
        continue
      d = [c - f for c, f in zip(cal["per_model"], fixed[best]["per_model"])]
      mean, std = demo.mean_std(d)
      worse = mean < 0 and (std is None or -mean > std)
      verdicts[method] = {"best_fixed": best, "diff_mean": mean, "diff_std": std,
                          "per_model": d, "worse_beyond_spread": worse}
    out[b] = {"rows": rows, "calibrated_vs_best_fixed": verdicts}
  return out


def markdown(agg: dict, unpruned: list) -> str:
  lines = [f"unpruned: {'; '.join(f'{u:.1f}' for u in unpruned)}", "",
           "| budget | schedule | held-out accuracy % (mean ± std) | schedules |",
           "| --- | --- | --- | --- |"]
  for b, res in agg.items():
    for n, r in res["rows"].items():
      acc = "out of reach" if r["mean"] is None else (
          f"{r['mean']:.1f}" + ("" if r["std"] is None else f" ± {r['std']:.1f}"))
      lines.append(f"| {b} | {n} | {acc} | {', '.join(f'`{s}`' for s in r['schedules'])} |")
  return "\n".join(lines)


def run(args) -> int:
  rows = vqa.read_questions(args.questions)
  key = vqa.read_answer_key(args.answer_key)
  cal, held = split_by_image(rows, args.calibration_images)
  held = held[:args.limit]
  for b in args.budgets:
    calibrate.parse_budget(b)
  models = [one_model(f, cal, held, key, args) for f in args.models]
  agg = aggregate(models, args.budgets, args.methods)
  print(markdown(agg, [mo["unpruned"] for mo in models]))
  for b, res in agg.items():
    for method, v in res["calibrated_vs_best_fixed"].items():
      if v["diff_mean"] is not None:
        print(f"budget {b}: calibrated {method} - {v['best_fixed']}: {v['diff_mean']:+.1f}"
              + ("" if v["diff_std"] is None else f" ± {v['diff_std']:.1f}")
              + (" (worse beyond the spread)" if v["worse_beyond_spread"] else ""))
  res = {"calibration_questions": len(cal), "held_out_questions": len(held),
         "budgets": args.budgets, "models": models, "aggregate": agg,
         "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k != "func"}}
  checkpoint.write_json(Path(args.out), res)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
