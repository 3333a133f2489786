"""Target test accuracy of a trained CADIT / source-only / DANN model on its digits task.

Example: jaxmm eval digits-da results/cadit/u2m-s0/model --out u2m.json
"""
import argparse
from pathlib import Path

import jaxmm.cli
from jaxmm import checkpoint
from jaxmm.cadit import evaluate, loop
from jaxmm.data import digits


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model", help="a model folder written by `jaxmm train cadit` (RUN/model) "
                      "or the run folder itself")
  parser.add_argument("--task", help="evaluate on this task instead of the one trained on")
  parser.add_argument("--target-npz", help="user .npz replacing the task's target domain")
  parser.add_argument("--source-npz", help="user .npz replacing the task's source domain")
  parser.add_argument("--out", help="write the results as JSON here")


def run(args) -> int:
  path = Path(args.model)
  if (path / "model").is_dir():
    path = path / "model"
  cfg, params, meta = loop.load_model(path)
  task = args.task or meta["task"]
  source, target = digits.load_task(task, cfg.image_size, args.source_npz, args.target_npz)
  res = {"model": str(path), "task": task, "method": cfg.method, "seed": meta.get("seed"),
         "target_acc": evaluate.accuracy(cfg, params, target.x_test, target.y_test),
         "source_acc": evaluate.accuracy(cfg, params, source.x_test, source.y_test)}
  if cfg.method == "cadit":
    res["label_flip_rate"] = evaluate.label_flip_rate(cfg, params, source.x_test, source.y_test)
  print(f"{'task':<12}{'method':<13}{'target acc':>11}{'source acc':>11}")
  print(f"{task:<12}{cfg.method:<13}{res['target_acc']:>11.4f}{res['source_acc']:>11.4f}")
  if args.out:
    checkpoint.write_json(args.out, res)
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
