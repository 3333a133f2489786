"""Train CADIT (or the source-only / DANN baselines) on a digits domain-adaptation task.

Example: jaxmm train cadit --task usps-mnist --method cadit --seed 0 --out results/cadit/u2m-s0
The run folder is resumable: run the same command again after an interruption.
"""
import argparse
import json

import jaxmm.cli
from jaxmm.cadit import config, loop
from jaxmm.data import digits
from jaxmm.errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--task", required=True, help=f"one of {sorted(digits.TASKS)}")
  parser.add_argument("--method", default="cadit", help=f"one of {list(config.METHODS)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--preset", default="digits-cpu", help=f"one of {sorted(config.PRESETS)}")
  parser.add_argument("--steps", type=int, help="adaptation steps (default: the preset's)")
  parser.add_argument("--pretrain-steps", type=int, help="source pre-training steps")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set use_sp=false (repeatable)")
  parser.add_argument("--out", help="run folder (default results/cadit/TASK-METHOD-sSEED)")
  parser.add_argument("--source-npz", help="user .npz replacing the task's source domain")
  parser.add_argument("--target-npz", help="user .npz replacing the task's target domain")
  parser.add_argument("--ckpt-every", type=int, default=250)
  parser.add_argument("--grid-every", type=int, default=250)
  parser.add_argument("--stop-after", type=int, help="stop (resumably) after this many steps")
  parser.add_argument("--fast-compile", action="store_true",
                      help="lower XLA optimisation: faster compiles, slower steps (smoke runs)")


def build_config(args) -> config.Config:
  if args.preset not in config.PRESETS:
    raise InputError(f"unknown preset {args.preset!r}; choose one of {sorted(config.PRESETS)}")
  cfg = config.PRESETS[args.preset]()
  over = [f"method={args.method}"] + list(args.set)
  if args.steps is not None:
    over.append(f"steps={args.steps}")
  if args.pretrain_steps is not None:
    over.append(f"pretrain_steps={args.pretrain_steps}")
  return cfg.override(over)


def run(args) -> int:
  if args.task not in digits.TASKS:
    raise InputError(f"unknown task {args.task!r}; choose one of {sorted(digits.TASKS)}")
  cfg = build_config(args)
  source, target = digits.load_task(args.task, cfg.image_size, args.source_npz, args.target_npz)
  out = args.out or f"results/cadit/{args.task}-{cfg.method}-s{args.seed}"
  spec = loop.RunSpec(cfg, args.task, args.seed)
  results = loop.train(spec, source, target, out, ckpt_every=args.ckpt_every,
                       grid_every=args.grid_every, stop_after=args.stop_after,
                       fast_compile=args.fast_compile)
  if results is None:
    print(f"stopped after {args.stop_after} steps; rerun to resume ({out})")
    return 0
  print(f"{args.task} {cfg.method} seed {args.seed}: target acc {results['target_acc']:.4f} "
        f"(source acc {results['source_acc']:.4f}, {results['iterations']} it, "
        f"{results['wall_s']:.0f} s)")
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
