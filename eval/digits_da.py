"""Target test accuracy of trained CADIT / source-only / DANN models on their digits tasks.

Examples:
  jaxmm eval digits-da results/cadit/usps-mnist-cadit-s0 --out u2m.json
  jaxmm eval digits-da results/cadit/*-s[012] --out results/cadit_table.json
With several runs it also prints the mean and std over seeds of each (task, config) group; the
iterations and wall time come from each run folder's results.json.
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
    acc = f"{100 * g['target_acc_mean']:.1f}"
    if len(g["seeds"]) > 1:  # one seed has no spread to show
      acc += f" ± {100 * g['target_acc_std']:.1f}"
    flip = f"{100 * g['label_flip_rate_mean']:.1f}" if "label_flip_rate_mean" in g else "-"
    iters = f"{g['iterations_mean']:.0f}" if "iterations_mean" in g else "-"
    wall = f"{g['wall_s_mean']:.0f}" if "wall_s_mean" in g else "-"
    print(f"{g['task']:<12}{g['method']:<13}{g['changes'] or '-':<{max(w, 9)}}{len(g['seeds']):>6}"
          f"{acc:>16}{flip:>8}{iters:>7}{wall:>8}")


def run(args) -> int:
  runs = [evaluate_run(Path(m), args) for m in args.model]
  print(f"{'task':<12}{'method':<13}{'seed':>5}{'target acc':>11}{'source acc':>11}  model")
  for r in runs:
    print(f"{r['task']:<12}{r['method']:<13}{r['seed']!s:>5}{r['target_acc']:>11.4f}"
          f"{r['source_acc']:>11.4f}  {r['model']}")
  out = runs[0]
  if len(runs) > 1:
    out = {"runs": runs, "summary": evaluate.summarize(runs)}
    _print_summary(out["summary"])
  if args.out:
    checkpoint.write_json(args.out, out)
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
