"""Target test accuracy of trained CADIT / source-only / DANN models on their digits tasks.

Examples:
  jaxmm eval digits-da results/cadit/usps-mnist-cadit-s0 --out u2m.json
  jaxmm eval digits-da results/cadit/*-s[012] --out results/cadit_table.json
With several runs it also prints the mean and std over seeds of each (task, config) group; the
iterations and wall time come from each run folder's results.json. `--markdown` also prints the
README's tables: methods side by side per task with CADIT's margins, one row per method with each
seed's accuracy, iterations and wall time, and one row per config variant (ablations).
"""
import argparse
import json
from pathlib import Path

import jaxmm.cli
from jaxmm import checkpoint
from jaxmm.cadit import evaluate, loop
from jaxmm.data import digits


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model", nargs="+", help="model folders written by `jaxmm train cadit` "
                      "(RUN/model) or the run folders themselves")
  parser.add_argument("--task", help="evaluate on this task instead of the one trained on")
  parser.add_argument("--target-npz", help="user .npz replacing the task's target domain")
  parser.add_argument("--source-npz", help="user .npz replacing the task's source domain")
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")


def evaluate_run(path: Path, args) -> dict:
  """One model's accuracies (recomputed) plus its run's iterations and wall time, if recorded."""
  run_dir = path.parent if path.name == "model" else path
  path = path / "model" if (path / "model").is_dir() else path
  cfg, params, meta = loop.load_model(path)
  task = args.task or meta["task"]
  source, target = digits.load_task(task, cfg.image_size, args.source_npz, args.target_npz)
  res = {"model": str(path), "task": task, "method": cfg.method, "seed": meta.get("seed"),
         "config": cfg.to_dict(),
         "target_acc": evaluate.accuracy(cfg, params, target.x_test, target.y_test),
         "source_acc": evaluate.accuracy(cfg, params, source.x_test, source.y_test)}
  if cfg.method == "cadit":
    res["label_flip_rate"] = evaluate.label_flip_rate(cfg, params, source.x_test, source.y_test)
  recorded = run_dir / "results.json"
  if recorded.is_file():
    res.update({k: v for k, v in json.loads(recorded.read_text()).items()
                if k in ("iterations", "wall_s")})
  return res


def _print_summary(groups: list[dict]) -> None:
  w = max(len(g["changes"]) for g in groups) + 2
  print(f"\n{'task':<12}{'method':<13}{'changes':<{max(w, 9)}}{'seeds':>6}{'target acc %':>16}"
        f"{'flip %':>8}{'iters':>7}{'wall s':>8}")
  for g in groups:
    acc = _pct(g)
    flip = f"{100 * g['label_flip_rate_mean']:.1f}" if "label_flip_rate_mean" in g else "-"
    iters = f"{g['iterations_mean']:.0f}" if "iterations_mean" in g else "-"
    wall = f"{g['wall_s_mean']:.0f}" if "wall_s_mean" in g else "-"
    print(f"{g['task']:<12}{g['method']:<13}{g['changes'] or '-':<{max(w, 9)}}{len(g['seeds']):>6}"
          f"{acc:>16}{flip:>8}{iters:>7}{wall:>8}")


TASK_NAMES = {"usps-mnist": "USPS -> MNIST", "mnist-usps": "MNIST -> USPS",
              "uci-usps": "UCI -> USPS"}
METHOD_NAMES = {"source-only": "source-only", "dann": "DANN", "cadit": "CADIT"}


def _pct(g) -> str:
  """Mean target accuracy of a group, with its spread when there are several seeds."""
  acc = f"{100 * g['target_acc_mean']:.1f}"
  return acc + (f" ± {100 * g['target_acc_std']:.1f}" if len(g["seeds"]) > 1 else "")


def _rows_table(header: list[str], rows: list[list[str]], right_from: int) -> list[str]:
  rule = ["---" if i < right_from else "---:" for i in range(len(header))]
  return ["| " + " | ".join(r) + " |" for r in [header, rule, *rows]]


def _method_table(summary: list[dict]) -> list[str]:
  """One row per task (and config changes shared across methods): methods side by side, with
  CADIT's margins over source-only and DANN."""
  by_row: dict[tuple, dict] = {}
  for g in summary:
    by_row.setdefault((g["task"], g["changes"]), {})[g["method"]] = g
  rows = []
  for (task, changes), ms in by_row.items():
    name = TASK_NAMES.get(task, task) + (f" ({changes})" if changes else "")
    row = [name, str(max(len(g["seeds"]) for g in ms.values()))]
    row += [_pct(ms[m]) if m in ms else "-" for m in METHOD_NAMES]
    c = ms.get("cadit")
    for m in ("source-only", "dann"):
      row.append(f"{100 * (c['target_acc_mean'] - ms[m]['target_acc_mean']):+.1f}"
                 if c and m in ms else "-")
    row.append(f"{100 * c['label_flip_rate_mean']:.1f}" if c and "label_flip_rate_mean" in c
               else "-")
    rows.append(row)
  header = ["task", "seeds", *METHOD_NAMES.values(), "CADIT - source-only", "CADIT - DANN",
            "CADIT flip %"]
  return _rows_table(header, rows, 1)


def _by_seed(values: list[str]) -> str:
  """'a / b / c' in seed order; one value when all seeds agree (e.g. the iterations)."""
  return values[0] if len(set(values)) == 1 else " / ".join(values)


def _per_run_table(runs: list[dict]) -> list[str]:
  """One row per (task, method, changes): each seed's accuracy and wall time, in seed order."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    changes = evaluate.preset_and_changes(r["config"])[1]
    groups.setdefault((r["task"], r["config"]["method"], changes), []).append(r)
  rows = []
  for (task, method, changes), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    rows.append([TASK_NAMES.get(task, task), method + (f" ({changes})" if changes else ""),
                 " / ".join(f"{100 * r['target_acc']:.2f}" for r in rs),
                 _by_seed([f"{100 * r['label_flip_rate']:.1f}" if "label_flip_rate" in r
                           else "-" for r in rs]),
                 _by_seed([str(r.get("iterations", "-")) for r in rs]),
                 " / ".join(f"{r['wall_s']:.0f}" if "wall_s" in r else "-" for r in rs)])
  header = ["task", "method", "target acc % by seed", "flip % by seed", "iterations",
            "wall s by seed"]
  return _rows_table(header, rows, 2)


def markdown(runs: list[dict], summary: list[dict]) -> str:
  return "\n".join(_method_table(summary) + [""] + _per_run_table(runs))


def run(args) -> int:
  runs = [evaluate_run(Path(m), args) for m in args.model]
  print(f"{'task':<12}{'method':<13}{'seed':>5}{'target acc':>11}{'source acc':>11}  model")
  for r in runs:
    print(f"{r['task']:<12}{r['method']:<13}{r['seed']!s:>5}{r['target_acc']:>11.4f}"
          f"{r['source_acc']:>11.4f}  {r['model']}")
  summary = evaluate.summarize(runs)
  out = runs[0]
  if len(runs) > 1:
    out = {"runs": runs, "summary": summary}
    _print_summary(summary)
  if args.markdown:
    print("\n" + markdown(runs, summary))
  if args.out:
    checkpoint.write_json(args.out, out)
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
