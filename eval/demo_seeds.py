"""The demo table over independently trained models: mean ± std across training seeds.

  python -m jaxmm.eval.demo_seeds [--seeds 0 1 2] [--preset robust] [--images 200]
      [--cache DIR] [--out results/demo_seeds.json] [--summary docs/demo_seeds.json]

For each training seed, trains the preset's model with that seed (`jaxmm.train.vlm.ensure_model`,
cached under the cache folder like `make demo`'s; seed 0 is `make demo`'s own model), evaluates
every demo configuration on the same test split (`jaxmm.demo.benchmark`, no latency timing; random
stages averaged over the demo's draw seeds), and aggregates per row: the mean and sample std
across the trained models of each accuracy.

Which differences it claims: for every pair of methods at one budget, the per-model difference
of overall accuracy; a difference is *consistent* when it has the same sign on every model and its
mean exceeds the across-model std of the difference (paired). Everything else is within the
spread. Prints the markdown table and the comparisons; writes the JSON (atomically) and, with
--summary, the spread figures `make demo` quotes below its single-model table.
"""
import argparse
import dataclasses
import itertools
import os
import statistics
from pathlib import Path

import jaxmm
import jaxmm.cli
from jaxmm import checkpoint, demo
from jaxmm.errors import InputError
from jaxmm.train import vlm


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
  p.add_argument("--preset", choices=sorted(vlm.PRESETS), default=demo.PRESET)
  p.add_argument("--images", type=int, default=200, help="test images (3 questions each)")
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--max-new-tokens", type=int, default=2)
  p.add_argument("--cache", default=os.environ.get("JAXMM_CACHE", demo.ROOT / "cache"))
  p.add_argument("--out", default=demo.ROOT / "results" / "demo_seeds.json")
  p.add_argument("--summary", help="also write the spread summary `make demo` prints (JSON)")


def per_model(args) -> list[dict]:
  """demo.benchmark of each training seed's model (trained when not cached)."""
  out = []
  base = vlm.PRESETS[args.preset]()
  split = demo.eval_split(Path(args.cache), base, args.images)
  batch = min(args.batch_size, 3 * args.images)
  for seed in args.seeds:
    folder = vlm.ensure_model(Path(args.cache), dataclasses.replace(base, seed=seed))
    print(f"training seed {seed}: {folder}", flush=True)
    res = demo.benchmark(jaxmm.load(folder), split, batch, args, timing=False)
    out.append({"training_seed": seed, "model": str(folder), **res})
  return out


def _key(row: dict) -> tuple:
  return row["method"], row["budget"]


def aggregate(models: list[dict]) -> list[dict]:
  """Per configuration: the schedule, FLOPs, and mean / sample std over models of accuracies."""
  rows = []
  for i, first in enumerate(models[0]["rows"]):
    mine = [m["rows"][i] for m in models]
    if any(_key(r) != _key(first) for r in mine):
      raise InputError("the models' configurations differ; train them with one preset")
    acc = lambda f: [f(r) for r in mine]
    stat = lambda xs: dict(zip(("mean", "std"), demo.mean_std(xs)))
    rows.append({"method": first["method"], "budget": first["budget"],
                 "schedule": first["schedule"], "average_visual": first["average_visual"],
                 "flops_reduction_pct": first["flops_reduction_pct"],
                 "overall": stat(acc(lambda r: r["overall_pct"])),
                 "overall_per_model": acc(lambda r: r["overall_pct"]),
                 "ink_kept": stat(acc(lambda r: r.get("ink_kept_pct"))),
                 **{k: stat(acc(lambda r, k=k: r["accuracy_pct"][k])) for k in demo.CATEGORIES}})
  return rows


def comparisons(rows: list[dict]) -> list[dict]:
  """Every pair of methods at one budget: the paired difference of overall accuracy (a - b)."""
  out = []
  for a, b in itertools.combinations([r for r in rows if r["method"] != "unpruned"], 2):
    if a["budget"] != b["budget"]:
      continue
    d = [x - y for x, y in zip(a["overall_per_model"], b["overall_per_model"])]
    mean, std = demo.mean_std(d)
    same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
    out.append({"budget": a["budget"], "a": a["method"], "b": b["method"], "diff_mean": mean,
                "diff_std": std, "per_model": d,
                "consistent": bool(same_sign and std is not None and abs(mean) > std)})
  return out


def _ms(s: dict) -> str:
  return "-" if s["mean"] is None else (f"{s['mean']:.1f}" + ("" if s["std"] is None
                                                               else f" ± {s['std']:.1f}"))


def markdown(rows: list[dict]) -> str:
  head = ("| method | budget (avg vis) | schedule | avg vis | cell | count | presence | overall "
          "| ink kept % | FLOPs reduction % |\n" + "| --- " * 10 + "|")
  lines = [f"| {r['method']} | {r['budget']} | `{r['schedule']}` | {r['average_visual']:.1f} | "
           + " | ".join(_ms(r[k]) for k in demo.CATEGORIES) + f" | {_ms(r['overall'])} | "
           f"{_ms(r['ink_kept'])} | {r['flops_reduction_pct']:.1f} |" for r in rows]
  return "\n".join([head] + lines)


def summary(models: list[dict], rows: list[dict], preset: str) -> dict:
  pruned = [r["overall"]["std"] for r in rows[1:] if r["overall"]["std"] is not None]
  return {"preset": preset, "models": len(models),
          "training_seeds": [m["training_seed"] for m in models],
          "unpruned_std": rows[0]["overall"]["std"], "pruned_std_min": min(pruned),
          "pruned_std_max": max(pruned), "pruned_std_median": statistics.median(pruned)}


def run(args) -> int:
  if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
    raise InputError(f"--seeds needs at least two distinct training seeds, got {args.seeds}")
  vlm.use_cpu_devices(vlm.PRESETS[args.preset]().batch_size)   # data-parallel training
  models = per_model(args)
  rows = aggregate(models)
  comps = comparisons(rows)
  print(markdown(rows))
  print("\ndifferences in overall accuracy (a - b, points), mean ± std over the models:")
  for c in comps:
    print(f"  {c['budget']:>4}  {c['a']:<16} - {c['b']:<16} {c['diff_mean']:+6.1f} ± "
          f"{c['diff_std']:.1f}  {'consistent' if c['consistent'] else 'within the spread'}")
  res = {"preset": args.preset, "training_seeds": args.seeds, "rows": rows,
         "comparisons": comps, "models": models}
  checkpoint.write_json(Path(args.out), res)
  print(f"wrote {args.out}")
  if args.summary:
    checkpoint.write_json(Path(args.summary), summary(models, rows, args.preset))
    print(f"wrote {args.summary}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
